"""The detector's pieces: targets, losses, decoding and NMS on device, COCO mAP, and the head's
export rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from finetune_jax.evaluation import detection_decoding, detection_prediction, detection_scores
from finetune_jax.models import lora as lora_lib
from finetune_jax.models import vit
from finetune_jax.models.detection_heads import cell_centers
from finetune_jax.models.vit_config import ViTConfig
from finetune_jax.tasks import detection_losses

CENTERS = cell_centers(8, 8, 7.0)  # a 56 px input at stride 7


def _labels(*boxes):
    """[1, M, 6] targets: (x0, y0, x1, y1, class) rows, flagged as objects, + one padding."""
    out = np.zeros((1, len(boxes) + 1, 6), np.float32)
    for i, box in enumerate(boxes):
        out[0, i] = [*box, 1.0]
    return jnp.asarray(out)


def test_targets_peak_at_each_centre_cell_and_weigh_every_object_alike():
    labels = _labels((10, 12, 30, 40, 2), (35, 5, 50, 20, 0))
    real = labels[..., 5] == 1
    gauss, centre, inside = jax.jit(detection_losses.gaussian_targets)(
        labels[..., :4], real, CENTERS.reshape(-1, 2)
    )
    classes = labels[..., 4].astype(jnp.int32)
    heat = np.asarray(detection_losses.class_maps(gauss, classes, 3)[0]).reshape(8, 8, 3)
    # Box centres (20, 26) and (42.5, 12.5) lie in cells (row 3, col 2) and (row 1, col 6).
    assert heat[3, 2, 2] == 1 and heat[1, 6, 0] == 1
    assert np.sum(heat == 1) == 2 and heat.max() <= 1 and heat[..., 1].max() == 0
    assert 0.1 < heat[3, 3, 2] < 1  # a neighbour gets its object's Gaussian, in its class
    target, weight = jax.jit(detection_losses.box_targets)(gauss, centre, inside, labels[..., :4])
    weight = np.asarray(weight[0]).reshape(8, 8)
    assert weight.sum() == pytest.approx(2.0, abs=1e-5)  # 1 per object, padding none
    np.testing.assert_allclose(np.asarray(target[0]).reshape(8, 8, 4)[3, 2], [10, 12, 30, 40])
    assert weight[7, 7] == 0  # far from both


def test_giou_of_known_boxes():
    a = jnp.asarray([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
    b = jnp.asarray([[0.0, 0, 2, 2], [2, 0, 3, 1], [1, 0, 3, 2]])
    # identical: 1; disjoint, hull 3 of union 2: -1/3; half overlap: IoU 2/6, hull = union.
    np.testing.assert_allclose(detection_losses.giou(a, b), [1, -1 / 3, 1 / 3], atol=1e-6)


def test_focal_loss_is_the_centernet_formula():
    logits = jnp.asarray([[[2.0, -1.0], [0.5, -3.0]]])
    target = jnp.asarray([[[1.0, 0.2], [0.5, 0.0]]])
    positive = target == 1
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    expected = -((1 - p[0, 0, 0]) ** 2) * np.log(p[0, 0, 0])
    for (i, j), y in {(0, 1): 0.2, (1, 0): 0.5, (1, 1): 0.0}.items():
        expected -= (1 - y) ** 4 * p[0, i, j] ** 2 * np.log(1 - p[0, i, j])
    got = detection_losses.focal_loss(logits, target, positive)
    np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_the_loss_falls_as_the_prediction_nears_the_target():
    labels = _labels((10, 12, 30, 40, 1))

    @jax.jit
    def loss_of(peak_logit, box):
        heat = jnp.full((1, 8, 8, 2), -4.0).at[0, 3, 2, 1].set(peak_logit)
        boxes = jnp.broadcast_to(jnp.asarray(box, jnp.float32), (1, 8, 8, 4))
        outputs = {"heatmap": heat, "boxes": boxes, "centers": CENTERS}
        loss_fn = detection_losses.loss_for(max_detections=10, nms_iou=0.5)
        return loss_fn(outputs, labels, jnp.ones(1))[0]

    loss = lambda peak_logit, box: float(loss_of(peak_logit, jnp.asarray(box, jnp.float32)))

    assert loss(4.0, (10, 12, 30, 40)) < loss(0.0, (10, 12, 30, 40)) < loss(0.0, (0, 0, 9, 9))
    assert loss(4.0, (10, 12, 30, 40)) < 0.1


def _greedy_nms(boxes, classes, scores, threshold):
    """Reference: textbook greedy per-class NMS in plain Python."""
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        a = boxes[i]
        suppressed = False
        for j in keep:
            b = boxes[j]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(
                0, min(a[3], b[3]) - max(a[1], b[1])
            )
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            suppressed |= classes[i] == classes[j] and inter / union > threshold
        if not suppressed:
            keep.append(i)
    return sorted(keep)


def test_class_nms_matches_greedy_nms():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 40, (30, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 20, (30, 2))], 1).astype(np.float32)
    classes = rng.integers(0, 3, 30)
    scores = np.sort(rng.uniform(0.1, 1, 30))[::-1].astype(np.float32)
    kept = jax.jit(detection_decoding.class_nms, static_argnums=3)(
        jnp.asarray(boxes), jnp.asarray(classes), jnp.asarray(scores), 0.3
    )
    assert list(np.flatnonzero(np.asarray(kept) > 0)) == _greedy_nms(boxes, classes, scores, 0.3)


def test_decode_takes_the_peaks_with_their_cells_boxes():
    heat = jnp.full((1, 4, 4, 2), -9.0)
    heat = heat.at[0, 1, 2, 0].set(3.0).at[0, 1, 3, 0].set(1.0)  # a peak and its shoulder
    heat = heat.at[0, 3, 0, 1].set(0.0)
    boxes = jnp.arange(64, dtype=jnp.float32).reshape(1, 4, 4, 4)
    decode = jax.jit(detection_decoding.decode, static_argnums=(3, 4))
    found = np.asarray(decode(heat, boxes, (100.0, 100.0), 3, 1.0)[0])
    assert found[0, 5] == 0 and found[0, 4] == pytest.approx(1 / (1 + np.exp(-3.0)))
    np.testing.assert_allclose(found[0, :4], np.arange(64).reshape(4, 4, 4)[1, 2])
    assert found[1, 5] == 1 and found[1, 4] == pytest.approx(0.5)  # the shoulder is no peak
    np.testing.assert_allclose(found[1, :4], np.minimum(np.arange(64).reshape(4, 4, 4)[3, 0], 100))


def test_coco_map_of_perfect_missing_and_misclassified_detections():
    truth = np.zeros((2, 6), np.float32)
    truth[0] = [10, 10, 30, 40, 0, 1]
    truth[1] = [50, 50, 70, 60, 1, 1]
    perfect = np.zeros((3, 6), np.float32)
    perfect[0] = [10, 10, 30, 40, 0.9, 0]
    perfect[1] = [50, 50, 70, 60, 0.8, 1]
    scores = detection_scores.coco_map([truth], [perfect], 2)
    assert scores == pytest.approx({"map": 1, "map_50": 1, "map_75": 1})
    wrong_class = perfect.copy()
    wrong_class[:2, 5] = 1 - wrong_class[:2, 5]
    assert detection_scores.coco_map([truth], [wrong_class], 2)["map_50"] == 0
    shifted = perfect.copy()
    shifted[0, :4] += [0, 10, 0, 10]  # IoU 20 / 40 = 0.5: found at 0.5, missed above
    scores = detection_scores.coco_map([truth], [shifted], 2)
    assert scores["map_50"] == pytest.approx(1) and scores["map_75"] == pytest.approx(0.5)


def test_head_rows_are_exactly_the_head_params():
    config = ViTConfig(
        model_type="dinov2", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, image_size=28, patch_size=14, layerscale_value=1.0,
        num_labels=3, detection_width=8, detection_upsample=4,
    )  # fmt: skip
    family = vit.DINOV2_FAMILY.with_head("detection")
    # Shapes only (traced, never compiled: this is about the layout).
    params = jax.eval_shape(lambda: nn.meta.unbox(family.init_params(config, jax.random.key(0))))
    head = {
        path: leaf.shape
        for path, leaf in lora_lib.flat_paths(params).items()
        if path.startswith("detection_head/")
    }
    rows = {m.path: m.shape for m in family.head.hf_rows(config)}
    assert rows == head and len(head) == 20  # two upsampling stages, neck, two branches
    apply = family.module_for(config).apply
    out = jax.eval_shape(lambda p: apply({"params": p}, jnp.zeros((1, 28, 42, 3))), params)
    assert out["heatmap"].shape == (1, 8, 12, 3) and out["boxes"].shape == (1, 8, 12, 4)


def test_a_picture_labels_each_object_once():
    found = [
        {"bbox": [10, 10, 20, 30], "category": "coat", "score": 0.6},
        {"bbox": [11, 10, 20, 30], "category": "shirt", "score": 0.5},  # the same object
        {"bbox": [50, 50, 10, 10], "category": "shirt", "score": 0.4},
    ]
    kept = detection_prediction.best_per_place(found)
    assert [d["score"] for d in kept] == [0.6, 0.4]
    picture = detection_prediction.draw_detections(
        Image.new("L", (80, 80)), kept, ["coat", "shirt"]
    )
    assert picture.mode == "RGB" and picture.size == (80, 80)
    assert np.asarray(picture)[10, 15].any()  # the first box's top edge is drawn
