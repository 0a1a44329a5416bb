"""The segmentation kind: its loss and scores against independent references, and a tiny
DINOv2 trained on real cut-and-paste rows through train / eval / predict / export."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.data import prediction_io
from finetune_jax.evaluation import segmentation_metrics
from finetune_jax.export import export
from finetune_jax.predict import predict
from finetune_jax.tasks import losses, segmentation
from finetune_jax.train import train
from finetune_jax.training import builder
from tests.helpers import SHARED_DATA
from tests.test_image_train import tiny_dinov2_dir  # noqa: F401 (a fixture)
from tests.test_segmentation_heads import _torch_grid, _torch_head

IGNORE = 255
CUTPASTE = SHARED_DATA / "cutpaste_fashion_elpv"


def test_pixel_loss_is_torch_cross_entropy_per_image_and_counts_confusions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (3, 5, 6)).astype(np.int32)
    labels[0, :2] = IGNORE
    labels[2] = IGNORE  # a row with nothing to count adds nothing
    weights = np.array([1.0, 0.5, 1.0], np.float32)
    loss_sum, confusion = losses.pixel_classification_loss(
        logits, labels, weights, ignore_index=IGNORE
    )
    per_row = [
        F.cross_entropy(
            torch.from_numpy(logits[i]).permute(2, 0, 1)[None],
            torch.from_numpy(labels[i]).long()[None],
            ignore_index=IGNORE,
        ).item()
        for i in range(2)
    ]
    np.testing.assert_allclose(float(loss_sum), per_row[0] + 0.5 * per_row[1], rtol=1e-5)
    predicted = logits.argmax(-1)
    for i in range(3):
        counted = labels[i] != IGNORE
        expected = np.zeros((4, 4))
        np.add.at(expected, (labels[i][counted], predicted[i][counted]), 1)
        np.testing.assert_array_equal(np.asarray(confusion[i]), expected)


def test_scores_are_set_iou_over_the_classes_present():
    rng = np.random.default_rng(1)
    true = rng.choice([0, 1, 2], size=400, p=[0.7, 0.2, 0.1])
    predicted = np.where(rng.random(400) < 0.8, true, rng.choice([0, 1, 3], size=400))
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (true, predicted), 1)
    names = ("background", "a", "b", "c", "never")
    got = segmentation_metrics.scores(confusion, names)
    iou = {}
    for k in range(4):  # class 4 is neither labelled nor predicted: left out of the mean
        inter = np.sum((true == k) & (predicted == k))
        iou[k] = inter / np.sum((true == k) | (predicted == k))
    assert got["iou_c"] == 0.0 and np.isnan(got["iou_never"])
    assert got["background_iou"] == pytest.approx(iou[0])
    assert got["iou_a"] == pytest.approx(iou[1]) and got["iou_b"] == pytest.approx(iou[2])
    assert got["mean_iou"] == pytest.approx(np.mean(list(iou.values())))
    assert got["pixel_accuracy"] == pytest.approx(np.mean(true == predicted))
    assert set(got) == set(segmentation_metrics.metric_names(names))


def segmentation_config(model_dir):
    """16 train / 6 validation cut-and-paste rows at 28 x 28, the decoder with LoRA, 2 steps."""
    config = base_config()
    config.model.name = str(model_dir)
    config.data.task = "segmentation_folder"
    config.data.dir = str(CUTPASTE)
    config.data.mask_dir = "semantic"
    config.data.image_size = 28
    config.data.max_train_rows, config.data.max_eval_rows = 16, 6
    config.model.segmentation_head = "decoder"
    config.model.segmentation_layers = 2
    config.model.decoder_channels = 16
    config.peft.rank = 4
    config.optim.preset = "lora"
    config.optim.lr = 1e-2
    config.train.batch_size = 4
    config.train.max_steps = 2
    config.train.eval_every = 0
    config.train.progress = False
    return config


def _split_iou(true: np.ndarray, predicted: np.ndarray) -> float:
    """mean IoU over the classes present, from all pixels at once, by sets."""
    counted = true != IGNORE
    true, predicted = true[counted], predicted[counted]
    ious = [
        np.sum((true == k) & (predicted == k)) / np.sum((true == k) | (predicted == k))
        for k in np.union1d(true, predicted)
    ]
    return float(np.mean(ious))


def test_train_predict_and_export_a_segmenter(tiny_dinov2_dir, tmp_path):  # noqa: F811
    config = segmentation_config(tiny_dinov2_dir)
    run = tmp_path / "run"
    summary = train(config, str(run))
    evals = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' in line]
    assert summary["metric"] == "mean_iou" and evals[-1]["examples"] == 6
    exp = builder.build(config, workdir=str(run))
    split = exp.data.load("validation")  # the 6 rows the run evaluated, in 2 batches of 4
    batch = exp.data.collate(split, np.arange(len(split)), exp.tokenizer)
    _, params = exp.restore_params(str(run), "2")
    logits = np.asarray(jax.jit(exp.module.apply)({"params": params}, batch["pixel_values"]))
    # The eval's IoU is the split's (intersections and unions over both batches, the
    # padding rows left out), not a mean of per-batch IoUs.
    iou = _split_iou(batch["labels"], logits.argmax(-1))
    assert evals[-1]["mean_iou"] == pytest.approx(iou)

    paths = [split.images.locate(i).strip("'") for i in range(len(split))]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = tmp_path / "predictions.jsonl"
    predict(config, str(run), str(listing), str(out), which="2", pictures=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == paths
    for i, row in enumerate(rows):
        mask = Image.open(row["mask"])  # class ids at the image's own size
        expected = Image.fromarray(logits[i].argmax(-1).astype(np.uint8)).resize(
            (224, 224), Image.Resampling.NEAREST
        )
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected))
        assert Image.open(row["picture"]).size == (224, 224)

    export(config, str(run), str(tmp_path / "hf"), which="2")
    model, info = transformers.Dinov2Model.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # missing / unexpected / mismatched keys
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["Dinov2Model"]
    assert hf_config["id2label"]["1"] == "t-shirt/top" and hf_config["num_labels"] == 11
    assert hf_config["segmentation_head"]["type"] == "decoder"
    head = safetensors.numpy.load_file(tmp_path / "hf" / "segmentation_head.safetensors")
    assert set(head) == {m.hf_key for m in exp.family.head.hf_rows(exp.model_config)}
    t = {k: torch.from_numpy(v) for k, v in head.items()}
    pixels = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2)
    with torch.no_grad():  # LoRA merged into the exported backbone: the same logits
        grid = _torch_grid(model.eval(), pixels, 2, cls_token=False)
        theirs = _torch_head("decoder", t, grid, pixels, 28).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(logits, theirs, atol=2e-4, rtol=1e-4)


def test_prediction_files_are_never_overwritten_unasked(tmp_path):
    files = prediction_io.FileOutputs(str(tmp_path / "files"))
    path = files.path("a.png")
    assert path == str(tmp_path / "files" / "a.png") and (tmp_path / "files").is_dir()
    open(path, "w").close()
    with pytest.raises(FileExistsError, match=r"a.png' exists .*pass --overwrite"):
        files.path("a.png")
    assert prediction_io.FileOutputs(str(tmp_path / "files"), overwrite=True).path("a.png")
    assert prediction_io.default_files_dir("out/preds.jsonl") == "out/preds_files"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.segmentation_head", "fpn", r"segmentation_head='fpn': expected one of"),
        ("model.decoder_channels", 30, "decoder_channels=30: .* a multiple of 4"),
        ("data.image_size", 0, "data.image_size=0: a segmentation run needs its input size"),
    ],
)
def test_wrong_options_are_refused_before_anything_loads(key, value, message):
    config = base_config()
    config.data.task, config.data.image_size = "segmentation_folder", 224
    config.model.segmentation_head = "decoder"
    section, leaf = key.split(".")
    config[section][leaf] = value
    task = segmentation.KIND.configured(config.data)
    with pytest.raises(ValueError, match=message):
        segmentation.KIND.check_options(config, task)
