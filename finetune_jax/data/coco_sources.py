"""One split of an object-detection task: images decoded on demand, and their objects (boxes,
classes, crowd flags) in memory.

Formats:
  coco  `data.dir/<split>/annotations.json` in COCO's layout: `images` (id, file_name relative
        to that folder), `annotations` (image_id, category_id, bbox [x, y, w, h] in pixels,
        iscrowd) and `categories` (id, name). Class ids are the categories in id order.
  hub   an HF `datasets` dataset (`data.hub_name`, or `data.dir` written by `save_to_disk`)
        with an image column (`data.image_column`) and an objects column
        (`data.objects_column`) of {"bbox": [[4 numbers], ...], "category": [ids]} per image,
        the layout of transformers' object-detection examples (e.g. cppe-5); boxes are
        [x, y, w, h] or [x0, y0, x1, y1] (`data.box_format`); class names from the category
        feature's ClassLabel, else `data.label_names`, else the sorted distinct ids.

Boxes are kept as COCO [x, y, w, h] floats in the image's own pixels, as the source gives
them; they are clipped to the image when a batch is made. A box without area, a category the
file does not declare or an annotation of an unknown image is a `DataError` naming the file
and the annotation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from finetune_jax.data.image_sources import ImageSplit, check_image_file, hub_dataset
from finetune_jax.data.text_sources import DataError

DETECTION_FORMATS = ("coco", "hub")
BOX_FORMATS = ("xywh", "xyxy")
ANNOTATIONS = "annotations.json"


@dataclasses.dataclass(frozen=True)
class Objects:
    """The objects of one image."""

    boxes: np.ndarray  # float32 [n, 4]: x, y, w, h in the image's pixels (COCO)
    classes: np.ndarray  # int32 [n]: class ids
    crowd: np.ndarray  # bool [n]: COCO `iscrowd` regions (scored as "ignore", never trained)

    def __len__(self) -> int:
        return len(self.classes)


NO_OBJECTS = Objects(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool))


@dataclasses.dataclass
class DetectionSplit:
    """Images (decoded on demand by `images`, whose labels are unused) and their objects.

    `image_ids`: the source's id of each image (COCO `id`; hub: the row number), the
    `image_id` predictions and records carry. `category_ids`: class id -> the source's
    category id (COCO `categories[].id`; hub: the category value).
    """

    images: ImageSplit
    objects: list[Objects]
    image_ids: np.ndarray
    category_ids: tuple[int, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.objects)

    def image(self, i: int) -> Image.Image:
        """Image i as RGB."""
        return self.images.image(i)

    def locate(self, i: int) -> str:
        return self.images.locate(i)


def take(split: DetectionSplit, rows: np.ndarray) -> DetectionSplit:
    """The images at `rows`, in that order."""
    rows = np.asarray(rows, np.int64)
    images = split.images
    chosen = ImageSplit(
        images.labels[rows],
        lambda i: images.read(int(rows[i])),
        lambda i: images.locate(int(rows[i])),
        images.source,
        check=None if images.check is None else lambda i: images.check(int(rows[i])),
    )
    objects = [split.objects[r] for r in rows]
    return dataclasses.replace(
        split, images=chosen, objects=objects, image_ids=split.image_ids[rows]
    )


def load_split(task: Any, data: Any, split: str) -> DetectionSplit:
    """Split `split` of `task` (a `tasks.detection.DetectionTask`); `data` is `config.data`."""
    if task.format == "coco":
        return _coco(data.dir, split)
    return _hub(task, data, split)


def category_names(task: Any, data: Any) -> tuple[str, ...]:
    """The class names the train split declares (COCO categories in id order)."""
    return load_split(task, data, "train").label_names


# ------------------------------------------------------------------------------- COCO files
def _coco(data_dir: str, split: str) -> DetectionSplit:
    if not data_dir:
        raise DataError(f"COCO detection reads data.dir/<split>/{ANNOTATIONS}: set data.dir")
    root = os.path.join(data_dir, split)
    path = os.path.join(root, ANNOTATIONS)
    if not os.path.isfile(path):
        raise DataError(f"{path!r} does not exist (split {split!r} of data.dir={data_dir!r})")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path!r} is not JSON: {e}") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise DataError(f"{path!r} lacks COCO's {missing} (it has {sorted(coco)})")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(cats)}
    images = coco["images"]
    row_of = {image["id"]: row for row, image in enumerate(images)}
    found: list[list[tuple[list[float], int, bool]]] = [[] for _ in images]
    for a in coco["annotations"]:
        where = f"{path!r} annotation id {a.get('id')}"
        if a.get("image_id") not in row_of:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not among its images")
        if a.get("category_id") not in class_of:
            raise DataError(
                f"{where}: category_id {a.get('category_id')!r} is not among its categories "
                f"{sorted(class_of)}"
            )
        box = _checked_box(a.get("bbox"), "xywh", where)
        found[row_of[a["image_id"]]].append(
            (box, class_of[a["category_id"]], bool(a.get("iscrowd")))
        )
    files = [os.path.join(root, image["file_name"]) for image in images]
    return DetectionSplit(
        ImageSplit(
            np.zeros(len(images), np.int32),
            lambda i: Image.open(files[i]),
            lambda i: f"{path!r} image id {images[i]['id']} ({files[i]!r})",
            path,
            check=lambda i: check_image_file(files[i]),
        ),
        [_objects(rows) for rows in found],
        np.asarray([image["id"] for image in images], np.int64),
        tuple(int(c["id"]) for c in cats),
        tuple(str(c["name"]) for c in cats),
    )


def _checked_box(box: Any, box_format: str, where: str) -> list[float]:
    """A box as COCO [x, y, w, h] floats, or a DataError saying what is wrong with it."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not np.all(np.isfinite(values)):
        raise DataError(f"{where}: bbox {box!r} is not 4 finite numbers")
    if box_format == "xyxy":
        values = [values[0], values[1], values[2] - values[0], values[3] - values[1]]
    if values[2] <= 0 or values[3] <= 0:
        raise DataError(
            f"{where}: bbox {box!r} ({box_format}) has no area; remove the annotation or "
            "fix its size" + ("" if box_format == "xyxy" else " (data.box_format='xyxy'?)")
        )
    return values


def _objects(rows: Sequence[tuple[list[float], int, bool]]) -> Objects:
    if not rows:
        return NO_OBJECTS
    boxes, classes, crowd = zip(*rows)
    return Objects(
        np.asarray(boxes, np.float32), np.asarray(classes, np.int32), np.asarray(crowd, bool)
    )


# ----------------------------------------------------------------------------- HF datasets
def _hub(task: Any, data: Any, split: str) -> DetectionSplit:
    return hub_split(*hub_dataset(data, split, task.name), task)


def hub_split(dataset: Any, source: str, task: Any) -> DetectionSplit:
    """A `datasets.Dataset` with an image and an objects column; images decoded per row."""
    image_column, objects_column = task.image_column, task.objects_column
    missing = [c for c in (image_column, objects_column) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{source} lacks columns {missing} (data.image_column / data.objects_column); "
            f"it has {dataset.column_names}"
        )
    declared = _declared_names(dataset.features[objects_column])
    table = [_as_columns(row) for row in dataset.select_columns([objects_column])[objects_column]]
    if task.category_ids is not None:  # another split: the train split's classes
        names, ids = task.label_names, task.category_ids
    elif declared or task.label_names:  # category values index the names
        names = declared or task.label_names
        ids = tuple(range(len(names)))
    else:  # the distinct category values, in order
        ids = tuple(sorted({int(c) for row in table for c in row.get("category") or []}))
        names = tuple(str(v) for v in ids)
    class_of = {category: i for i, category in enumerate(ids)}
    objects = [
        _hub_objects(row, class_of, task.box_format, f"{source} row {i}")
        for i, row in enumerate(table)
    ]
    images = dataset.select_columns([image_column])
    return DetectionSplit(
        ImageSplit(
            np.zeros(len(table), np.int32),
            lambda i: images[int(i)][image_column],
            lambda i: f"{source} row {i}",
            source,
        ),
        objects,
        np.arange(len(table), dtype=np.int64),
        ids,
        tuple(names),
    )


def _declared_names(feature: Any) -> tuple[str, ...] | None:
    """The ClassLabel names of an objects column's `category`, if it declares them."""
    inner = feature.feature if hasattr(feature, "feature") else feature  # Sequence({...})
    category = inner.get("category") if isinstance(inner, dict) else None
    category = getattr(category, "feature", category)  # Sequence(ClassLabel) or List
    names = getattr(category, "names", None)
    return tuple(names) if names else None


def _as_columns(row: Any) -> dict[str, Any]:
    """An objects cell as {"bbox": [...], "category": [...]}: `Sequence({...})` features
    give that already, `List({...})` ones a list of per-object dicts."""
    if isinstance(row, list):
        return {key: [o.get(key) for o in row] for key in ("bbox", "category")}
    return row or {}


def _hub_objects(
    row: dict[str, Any], class_of: dict[int, int], box_format: str, where: str
) -> Objects:
    boxes, categories_ = row.get("bbox") or [], row.get("category") or []
    if len(boxes) != len(categories_):
        raise DataError(
            f"{where}: {len(boxes)} boxes but {len(categories_)} categories in its objects "
            "(it needs 'bbox' and 'category' lists of one length)"
        )
    rows = []
    for j, (box, category) in enumerate(zip(boxes, categories_)):
        if int(category) not in class_of:
            raise DataError(
                f"{where} object {j}: category {category!r} is not one of the task's "
                f"{len(class_of)} classes (data.label_names)"
            )
        rows.append(
            (_checked_box(box, box_format, f"{where} object {j}"), class_of[int(category)], False)
        )
    return _objects(rows)


def box_format_check(box_format: str) -> None:
    """Refuses a `data.box_format` that is not one of BOX_FORMATS."""
    if box_format not in BOX_FORMATS:
        raise ValueError(
            f"data.box_format={box_format!r}: expected 'xywh' (COCO: corner, width, height) "
            "or 'xyxy' (two corners)"
        )
