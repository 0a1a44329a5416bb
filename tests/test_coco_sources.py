"""Detection data: COCO folders and HF datasets read into objects, box targets padded to a
fixed count, and boxes that move with the pixels through the placement and augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.data import coco_batches, coco_sources, image_preprocess
from finetune_jax.data.coco_sources import Objects
from finetune_jax.data.text_sources import DataError
from finetune_jax.tasks import detection
from tests.helpers import SHARED_DATA

CUTPASTE = SHARED_DATA / "cutpaste_fashion_elpv"


def _task(name="coco_detection", **data_values):
    data = base_config().data
    data.task = name
    for key, value in data_values.items():
        data[key] = value
    return detection.KIND.configured(data), data


def test_reads_the_shared_coco_validation_split():
    task, data = _task(dir=str(CUTPASTE))
    split = coco_sources.load_split(task, data, "validation")
    raw = json.loads((CUTPASTE / "validation" / "annotations.json").read_text())
    assert len(split) == len(raw["images"]) == 200
    assert sum(len(o) for o in split.objects) == len(raw["annotations"]) == 506
    assert split.label_names[0] == "t-shirt/top" and len(split.label_names) == 10
    first = raw["annotations"][0]
    row = [image["id"] for image in raw["images"]].index(first["image_id"])
    assert split.image_ids[row] == first["image_id"]
    np.testing.assert_allclose(split.objects[row].boxes[0], first["bbox"])
    assert split.objects[row].classes[0] == first["category_id"] - 1  # ids 1..10 -> 0..9
    assert split.image(row).size == (224, 224) and split.image(row).mode == "RGB"


def _write_coco(root, annotations, categories=({"id": 7, "name": "cat"},)):
    (root / "train").mkdir(parents=True)
    Image.new("L", (20, 10)).save(root / "train" / "a.png")
    coco = {
        "images": [{"id": 3, "file_name": "a.png", "width": 20, "height": 10}],
        "annotations": annotations,
        "categories": list(categories),
    }
    (root / "train" / "annotations.json").write_text(json.dumps(coco))


@pytest.mark.parametrize(
    "annotation,message",
    [
        ({"id": 5, "image_id": 9, "category_id": 7, "bbox": [1, 1, 2, 2]}, "image_id 9"),
        ({"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2]}, "category_id 1"),
        ({"id": 5, "image_id": 3, "category_id": 7, "bbox": [1, 1, 0, 2]}, "no area"),
        ({"id": 5, "image_id": 3, "category_id": 7, "bbox": [1, 1, 2]}, "not 4 finite"),
    ],
)
def test_a_bad_annotation_is_an_error_naming_it(tmp_path, annotation, message):
    _write_coco(tmp_path, [annotation])
    task, data = _task(dir=str(tmp_path))
    with pytest.raises(DataError, match=message) as error:
        coco_sources.load_split(task, data, "train")
    assert "annotations.json" in str(error.value) and "annotation id 5" in str(error.value)


def test_categories_keep_their_ids_and_crowd_regions_are_flagged(tmp_path):
    annotations = [
        {"id": 1, "image_id": 3, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 1},
        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [0, 0, 5, 5]},
    ]
    _write_coco(tmp_path, annotations, [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}])
    task, data = _task(dir=str(tmp_path))
    split = coco_sources.load_split(task, data, "train")
    assert split.label_names == ("dog", "cat") and split.category_ids == (2, 7)  # id order
    np.testing.assert_array_equal(split.objects[0].classes, [1, 0])
    np.testing.assert_array_equal(split.objects[0].crowd, [True, False])


def test_hub_dataset_with_an_objects_column(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=["ball", "cup"]),
                }
            ),
        }
    )
    rows = {
        "image": [Image.new("RGB", (16, 12)), Image.new("RGB", (8, 8))],
        "objects": [
            {"bbox": [[1, 2, 5, 8], [0, 0, 4, 4]], "category": [1, 0]},
            {"bbox": [], "category": []},
        ],
    }
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows, features=features)}
    ).save_to_disk(tmp_path / "hub")
    task, data = _task("detection_hub", dir=str(tmp_path / "hub"), box_format="xyxy")
    split = coco_sources.load_split(task, data, "train")
    assert split.label_names == ("ball", "cup") and len(split) == 2
    np.testing.assert_allclose(split.objects[0].boxes, [[1, 2, 4, 6], [0, 0, 4, 4]])  # xywh
    np.testing.assert_array_equal(split.objects[0].classes, [1, 0])
    assert len(split.objects[1]) == 0 and split.image(0).size == (16, 12)


class _Split:
    """A one-image detection split over an in-memory image."""

    def __init__(self, image, objects):
        self._image, self.objects = image, [objects]

    def __len__(self):
        return 1

    def image(self, i):
        return self._image

    def locate(self, i):
        return "image.png"


class _Processor:
    """Rescale only (mean 0, std 1): pixel values stay proportional to the image's."""

    do_center_crop, crop_size, size = False, None, {"height": 32, "width": 32}

    def __call__(self, images, do_resize, do_center_crop, return_tensors):
        return {
            "pixel_values": np.stack(
                [np.asarray(i, np.float32).transpose(2, 0, 1) / 255 for i in images]
            )
        }


def _bright_box_image():
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:44] = 255  # the object: x 20..44, y 10..30
    return Image.fromarray(image), Objects(
        np.asarray([[20, 10, 24, 20]], np.float32), np.asarray([3], np.int32), np.zeros(1, bool)
    )


def test_eval_batches_stretch_the_whole_image_and_its_boxes():
    image, objects = _bright_box_image()
    batch = coco_batches.collate(
        _Split(image, objects), np.array([0, -1]), _Processor(), max_boxes=3
    )
    assert batch["pixel_values"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(batch["labels"][0, 0], [10, 10 / 48 * 32, 22, 30 / 48 * 32, 3, 1])
    assert not batch["labels"][0, 1:].any() and not batch["labels"][1].any()
    np.testing.assert_array_equal(batch["weights"], [1, 0])


@pytest.mark.parametrize("seed", range(6))
def test_augmented_boxes_move_with_the_pixels(seed):
    image, objects = _bright_box_image()
    augment = image_preprocess.Augment(scale=(0.3, 1.0), flip=True)
    batch = coco_batches.collate(
        _Split(image, objects), np.array([0]), _Processor(), augment, seed, max_boxes=2
    )
    bright = batch["pixel_values"][0, ..., 0] > 0.5
    boxes = batch["labels"][0]
    if not boxes[0, 5]:  # the crop left the object out: then nothing bright remains either
        assert not bright[1:-1, 1:-1].any()
        return
    x0, y0, x1, y1 = boxes[0, :4]
    ys, xs = np.nonzero(bright)
    # The bright pixels are the box's, to a pixel of bilinear blur at its edges.
    assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and abs(xs.min() - x0) <= 1.5
    assert (
        ys.min() >= np.floor(y0) - 1 and ys.max() <= np.ceil(y1) and abs(ys.max() + 1 - y1) <= 1.5
    )


def test_an_image_with_more_boxes_than_max_boxes_is_an_error_naming_it():
    image, objects = _bright_box_image()
    many = Objects(np.repeat(objects.boxes, 3, 0), np.zeros(3, np.int32), np.zeros(3, bool))
    with pytest.raises(DataError, match=r"image.png: 3 boxes, more than data.max_boxes=2"):
        coco_batches.check_box_counts(_Split(image, many), 2)
