"""Segmentation data: folder and hub sources (pairs, class names, and the errors that name a
file), and batches whose masks move with their pixels, deterministically and resumably."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import transformers
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.data import image_preprocess, segmentation_loader, segmentation_sources
from finetune_jax.data.text_sources import DataError
from finetune_jax.tasks import segmentation

IGNORE = 255


def _scene(seed: int, size=(40, 32)):
    """A dark image with a bright rectangle, and its mask (class 1 + seed % 2 there)."""
    rng = np.random.default_rng(seed)
    width, height = size
    x, y = int(rng.integers(0, width - 12)), int(rng.integers(0, height - 12))
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + 12, x : x + 12] = 1 + seed % 2
    mask[0, 0] = IGNORE  # one pixel no loss counts
    pixels = np.where(mask > 0, 230, 20).astype(np.uint8)
    pixels[0, 0] = 20
    return Image.fromarray(pixels, mode="L"), Image.fromarray(mask, mode="L")


def write_folder(root, split: str, count: int, categories=("cat", "dog")) -> None:
    """`root/<split>/images|masks/*.png` and a COCO annotations.json naming the classes."""
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = _scene(i)
        image.save(root / split / "images" / f"{i:03d}.png")
        mask.save(root / split / "masks" / f"{i:03d}.png")
    names = [{"id": k + 1, "name": n} for k, n in enumerate(categories)]
    (root / split / "annotations.json").write_text(json.dumps({"categories": names}))


@pytest.fixture
def processor(tmp_path):
    transformers.BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(tmp_path / "processor")
    return image_preprocess.load_processor(str(tmp_path / "processor"), image_size=16)


def _config(root, **data):
    config = base_config()
    config.data.task = "segmentation_folder"
    config.data.dir = str(root)
    config.data.image_size = 16
    config.train.batch_size = 4
    for key, value in data.items():
        config.data[key] = value
    return config


def _data(config, processor):
    task = segmentation.KIND.configured(config.data)
    return segmentation_loader.SegmentationData(config, task, processor)


def test_folder_pairs_images_with_masks_and_names_classes_from_coco(tmp_path, processor):
    write_folder(tmp_path, "train", 6)
    data = _data(_config(tmp_path), processor)
    assert data.task.label_names == ("background", "cat", "dog")
    split = data.load("train")
    assert len(split) == 6
    for i in range(6):
        image, mask = _scene(i)
        np.testing.assert_array_equal(split.mask(i, image.size, 3, IGNORE), np.asarray(mask))
        np.testing.assert_array_equal(np.asarray(split.image(i))[..., 0], np.asarray(image))
    given = _data(_config(tmp_path, label_names=("bg", "a", "b", "c")), processor)
    assert given.task.label_names == ("bg", "a", "b", "c")


def test_folder_errors_name_the_file(tmp_path, processor):
    write_folder(tmp_path, "train", 3)
    (tmp_path / "train" / "masks" / "002.png").unlink()
    with pytest.raises(DataError, match="without a matching mask, e.g. '002'"):
        _data(_config(tmp_path), processor).load("train")
    Image.new("RGB", (40, 32)).save(tmp_path / "train" / "masks" / "002.png")
    data = _data(_config(tmp_path), processor)
    split = data.load("train")
    with pytest.raises(DataError, match=r"masks/002.png.*mode 'RGB'.*not colours"):
        split.mask(2, (40, 32), 3, IGNORE)
    Image.fromarray(np.full((32, 40), 7, np.uint8)).save(tmp_path / "train" / "masks" / "002.png")
    with pytest.raises(DataError, match=r"002.png.*values \[7\].*3 classes.*ignore_index=255"):
        split.mask(2, (40, 32), 3, IGNORE)
    with pytest.raises(DataError, match=r"002.png.*mask is 40x32 but its image .* is 41x32"):
        split.mask(2, (41, 32), 3, IGNORE)
    (tmp_path / "train" / "images" / "001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of 3 train images cannot be read.*001.png"):
        _data(_config(tmp_path), processor).load("train")  # a split's files: checked once
    (tmp_path / "train" / "annotations.json").unlink()
    with pytest.raises(DataError, match="name the classes in data.label_names"):
        _data(_config(tmp_path), processor)


def test_hub_dataset_reads_image_and_mask_columns(tmp_path, processor):
    scenes = [_scene(i) for i in range(5)]
    features = datasets.Features({"picture": datasets.Image(), "label_map": datasets.Image()})
    table = {"picture": [s[0] for s in scenes], "label_map": [s[1] for s in scenes]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(table, features=features)}
    ).save_to_disk(str(tmp_path / "hub"))
    config = _config(tmp_path / "hub", image_column="picture", mask_column="label_map")
    config.data.task, config.data.label_names = "segmentation_hub", ("bg", "x", "y")
    split = _data(config, processor).load("train")
    assert len(split) == 5
    np.testing.assert_array_equal(split.mask(3, (40, 32), 3, IGNORE), np.asarray(scenes[3][1]))
    config.data.mask_column = "labels"
    with pytest.raises(DataError, match=r"lacks columns \['labels'\]"):
        _data(config, processor).load("train")


def test_batches_move_masks_with_pixels_and_resume_exactly(tmp_path, processor):
    write_folder(tmp_path, "train", 6)
    config = _config(tmp_path, augment_scale=(0.3, 1.0), crop_size=12)  # eval: 16 x 16
    data = _data(config, processor)
    batches = data.train_batches()
    seen = [next(batches) for _ in range(3)]
    state = batches.state()
    expected = next(batches)
    for batch in seen + [expected]:
        pixels, labels = batch["pixel_values"][..., 0], batch["labels"]
        item, background = (labels > 0) & (labels != IGNORE), labels == 0
        # Bright (normalised 230 -> 0.8) where the mask says item; dark elsewhere, but for
        # the bilinear blur at the edges: the medians tell.
        assert np.median(pixels[item]) > 0.5 and np.median(pixels[background]) < -0.5
        assert batch["labels"].shape == (4, 12, 12) and batch["weights"].tolist() == [1] * 4
        assert batch["pixel_values"].shape == (4, 12, 12, 3)
    resumed = data.train_batches()
    resumed.restore(state)
    again = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(again[key], expected[key])


def test_eval_batches_hold_whole_images_and_ignore_padding(tmp_path, processor):
    write_folder(tmp_path, "validation", 5)
    data = _data(_config(tmp_path, label_names=("bg", "a", "b")), processor)
    split = data.load("validation")
    batches = list(data.eval_batches(split))
    assert data.eval_batch_count(split) == len(batches) == 2
    last = batches[1]
    assert last["weights"].tolist() == [1, 0, 0, 0] and (last["labels"][1:] == IGNORE).all()
    image, mask = _scene(4)
    expected = np.asarray(mask.resize((16, 16), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(last["labels"][0], expected)
    pixels = image_preprocess.normalised(
        processor, [image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)]
    )
    np.testing.assert_allclose(last["pixel_values"][0], pixels[0], atol=1e-6)


def test_class_names_need_coco_ids_one_to_k(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}]}))
    with pytest.raises(DataError, match=r"category ids \[1, 3\] are not 1..2"):
        segmentation_sources.coco_class_names(str(path))
