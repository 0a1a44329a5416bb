"""dense_augment: one placement moves an image, its mask and its boxes together."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune_jax.data import dense_augment
from finetune_jax.data.image_preprocess import Augment, example_rng

IGNORE = 255


def _scene(width=60, height=40):
    """A mask with two rectangles (classes 3 and 7), the image drawing them, their boxes."""
    mask = np.zeros((height, width), np.uint8)
    boxes = np.array([[5, 8, 20, 12], [38, 20, 15, 17]], np.float64)  # x, y, w, h
    for (x, y, w, h), value in zip(boxes.astype(int), (3, 7)):
        mask[y : y + h, x : x + w] = value
    image = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L")
    return image, mask, boxes, np.array([3, 7])


def _extent(mask, value):
    """(x0, y0, x1, y1) of the pixels of `value`, or None."""
    rows, cols = np.nonzero(mask == value)
    if not rows.size:
        return None
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_placements_are_drawn_from_the_generator_alone():
    augment = Augment(scale=(0.2, 1.0))
    first = dense_augment.sample_placement(60, 40, 32, augment, example_rng(1, 0, 5))
    again = dense_augment.sample_placement(60, 40, 32, augment, example_rng(1, 0, 5))
    others = {
        dense_augment.sample_placement(60, 40, 32, augment, example_rng(1, e, 5)) for e in range(8)
    }
    assert first == again and len(others) > 1
    flips = {p.flip for p in others} | {
        dense_augment.sample_placement(60, 40, 32, augment, example_rng(2, e, 5)).flip
        for e in range(8)
    }
    assert flips == {True, False}
    no_flip = Augment(scale=(0.2, 1.0), flip=False)
    assert not any(
        dense_augment.sample_placement(60, 40, 32, no_flip, example_rng(1, e, 5)).flip
        for e in range(16)
    )


def test_mask_follows_pil_nearest_and_lines_up_with_the_image():
    image, mask, _, _ = _scene()
    for epoch in range(6):
        rng = example_rng(0, epoch, 0)
        placement = dense_augment.sample_placement(60, 40, 32, Augment(scale=(0.3, 1.0)), rng)
        got = dense_augment.warp_mask(mask, placement, IGNORE)
        # PIL's own nearest resize of the same window is the reference.
        reference = Image.fromarray(mask).resize(
            (32, 32), Image.Resampling.NEAREST, box=placement.window
        )
        if placement.flip:
            reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        np.testing.assert_array_equal(got, np.asarray(reference))
        pixels = np.asarray(dense_augment.warp_image(image, placement))
        # Bilinear blurs the edges only: well inside an item it is bright, well outside dark.
        inside = (got > 0) & (_eroded(got > 0))
        outside = (got == 0) & (_eroded(got == 0))
        assert pixels[inside].min() > 200 and (pixels[outside].max(initial=0) < 55)


def _eroded(region):
    """`region` less the pixels next to its border (4-neighbourhood, edges kept out)."""
    padded = np.pad(region, 1)
    return (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )  # fmt: skip


def test_a_mask_item_and_its_box_move_together():
    _, mask, boxes, labels = _scene()
    moved = 0
    for epoch in range(12):
        rng = example_rng(3, epoch, 0)
        placement = dense_augment.sample_placement(60, 40, 48, Augment(scale=(0.3, 1.0)), rng)
        got_mask = dense_augment.warp_mask(mask, placement, IGNORE)
        got_boxes, got_labels = dense_augment.warp_boxes(boxes, labels, placement)
        for box, label in zip(got_boxes, got_labels):
            extent = _extent(got_mask, label)
            assert extent is not None, (placement, label)
            x, y, w, h = box
            # The mask's pixels of the item fill its box up to the nearest-pixel rounding.
            np.testing.assert_allclose(extent, (x, y, x + w, y + h), atol=1.0)
            moved += 1
        for label in set(labels.tolist()) - set(got_labels.tolist()):
            extent = _extent(got_mask, label)  # a dropped box keeps at most a sliver
            assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 2
    assert moved >= 12


def test_flip_mirrors_boxes_and_masks():
    _, mask, boxes, labels = _scene()
    placement = dense_augment.Placement((0.0, 0.0, 60.0, 40.0), 60, flip=True)
    got_boxes, _ = dense_augment.warp_boxes(boxes, labels, placement)
    got_mask = dense_augment.warp_mask(mask, placement, IGNORE)
    assert got_mask.shape == (60, 60)
    np.testing.assert_allclose(got_boxes[0], [60 - 25, 8 * 1.5, 20, 12 * 1.5])
    assert _extent(got_mask, 3) == (35, 12, 55, 30)


def test_boxes_cropped_away_are_dropped_with_their_labels():
    _, _, boxes, _ = _scene()
    fields = np.array([[3, 101], [7, 102]])  # several per-box fields travel together
    window = dense_augment.Placement((30.0, 10.0, 60.0, 40.0), 30)  # the right half
    got_boxes, got_fields = dense_augment.warp_boxes(boxes, fields, window)
    assert got_fields.tolist() == [[7, 102]]
    np.testing.assert_allclose(got_boxes, [[8, 10, 15, 17]])
    sliver = dense_augment.Placement((24.6, 0.0, 54.6, 30.0), 30)  # 0.4 px of box 1 left
    assert dense_augment.warp_boxes(boxes, fields, sliver)[1].tolist() == [[7, 102]]
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        dense_augment.warp_boxes(boxes, fields[:1], window)


def test_outside_the_image_is_ignored_in_the_mask_and_black_in_the_image():
    image, mask, _, _ = _scene()
    # The 60 x 40 image lands on output x 15-45, y 15-45 (scales 0.5 and 0.75).
    zoomed_out = dense_augment.Placement((-30.0, -20.0, 90.0, 60.0), 60)
    got = dense_augment.warp_mask(mask, zoomed_out, IGNORE)
    assert (got[:, :15] == IGNORE).all() and (got[:15] == IGNORE).all()
    assert (got[:, 45:] == IGNORE).all() and (got[45:] == IGNORE).all()
    assert IGNORE not in got[15:45, 15:45] and {3, 7} <= set(np.unique(got).tolist())
    pixels = np.asarray(dense_augment.warp_image(image, zoomed_out))
    assert pixels[:, :14].max() == 0 and pixels[:14].max() == 0


def test_whole_image_is_a_plain_resize():
    image, mask, boxes, labels = _scene()
    placement = dense_augment.whole_image(60, 40, 30)
    np.testing.assert_array_equal(
        np.asarray(dense_augment.warp_image(image, placement)),
        np.asarray(image.resize((30, 30), Image.Resampling.BILINEAR)),
    )
    got_boxes, _ = dense_augment.warp_boxes(boxes, labels, placement)
    np.testing.assert_allclose(got_boxes[0], [2.5, 6, 10, 9])
    with pytest.raises(ValueError, match="empty"):
        dense_augment.Placement((5.0, 5.0, 5.0, 9.0), 10)
