"""One split of a semantic-segmentation task: images and class-id masks, decoded on demand.

Formats (`SegmentationTask.format`):
  folder  `data.dir/<split>/images/<name>.<ext>` and `data.dir/<split>/<data.mask_dir>/<name>.png`
          (one mask per image, same file stem). Class names: `data.label_names`, else the COCO
          `categories` of `data.dir/train/annotations.json` (category id k = mask value k; 0 is
          "background").
  hub     an HF `datasets` dataset with an image column (`data.image_column`) and a mask
          column (`data.mask_column`, an Image of class ids): `data.hub_name` by hub name, or
          `data.dir` saved with `save_to_disk`. Class names: `data.label_names`.

A mask holds class ids (PNG mode L, P or I: a palette PNG's indices are the ids); the value
`data.ignore_index` marks pixels no loss or metric counts. Images and masks are two
`ImageSplit`s of equal length, so selection, file checks and subsets are image_sources' own;
`mask(i)` checks each mask as it is decoded (its size, its values) and names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from finetune_jax.data.image_sources import ImageSplit, check_image_file, hub_dataset, take
from finetune_jax.data.text_sources import DataError

SEGMENTATION_FORMATS = ("folder", "hub")
IMAGES_DIR = "images"  # folder format: the images of a split, beside its masks
MASK_MODES = ("L", "P", "I", "I;16")  # PIL modes whose values are class ids


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
    """Semantic segmentation: a class id per pixel.

    Attributes:
      name: registry key.
      format: "folder" or "hub" (see the module docstring).
      label_names: class names, index = class id (0 = background); None = from
        `data.label_names` or the train split's annotations.json.
      mask_dir: folder format: the sub-folder of each split holding the masks.
      mask_column: hub format: the column holding the masks.
      ignore_index: mask value of pixels that no loss or metric counts.
      head: the run's segmentation head settings (type, layers read...), written into an
        export's config.json so a reader can rebuild the head; set by `resolve`.
    """

    name: str
    format: str
    label_names: tuple[str, ...] | None = None
    mask_dir: str = "masks"
    mask_column: str = "mask"
    ignore_index: int = 255
    head: tuple[tuple[str, Any], ...] = ()
    kind = "segmentation"
    metrics = ()  # all from the confusion matrix (evaluation/segmentation_metrics.py)
    main_metric = "mean_iou"
    is_regression = False
    is_multi_label = False
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV

    def __post_init__(self):
        if self.format not in SEGMENTATION_FORMATS:
            raise ValueError(
                f"task {self.name}: format {self.format!r} not in {SEGMENTATION_FORMATS}"
            )

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: class names are not resolved yet (set data.label_names, or "
                "build the run's loader, which reads them from annotations.json)"
            )
        return len(self.label_names)


@dataclasses.dataclass
class SegmentationSplit:
    """Images and their masks (None: unlabelled images, as predict reads them)."""

    images: ImageSplit
    masks: ImageSplit | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        """Example i as an RGB image."""
        return self.images.image(i)

    def mask(self, i: int, size: tuple[int, int], classes: int, ignore: int) -> np.ndarray:
        """Example i's mask as int32 [H, W]; its size must be the image's `size` (W, H) and
        every value a class id below `classes` or `ignore`."""
        assert self.masks is not None, "an unlabelled split has no masks"
        where = self.masks.locate(i)
        try:
            mask = self.masks.read(i)
            mode = mask.mode
            values = np.asarray(mask)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: could not decode the mask: {e}") from e
        if mode not in MASK_MODES:
            raise DataError(
                f"{where}: mask of PIL mode {mode!r}; a mask holds one class id per pixel "
                f"(modes {', '.join(MASK_MODES)}), not colours: convert it to ids"
            )
        if mask.size != size:
            raise DataError(
                f"{where}: mask is {mask.size[0]}x{mask.size[1]} but its image "
                f"({self.images.locate(i)}) is {size[0]}x{size[1]}"
            )
        bad = ((values >= classes) & (values != ignore)) | (values < 0)
        if bad.any():
            found = sorted({int(v) for v in np.unique(values[bad])})[:5]
            raise DataError(
                f"{where}: mask values {found} are neither class ids (0-{classes - 1}: "
                f"{classes} classes) nor data.ignore_index={ignore}; name every class in "
                "data.label_names, or set data.ignore_index"
            )
        return values.astype(np.int32)


def subset(split: SegmentationSplit, rows: np.ndarray) -> SegmentationSplit:
    """The examples at `rows`, in that order."""
    masks = None if split.masks is None else take(split.masks, rows)
    return SegmentationSplit(take(split.images, rows), masks, split.source)


def load_split(task: SegmentationTask, data: Any, split: str) -> SegmentationSplit:
    """Split `split` of `task` (no image decoded); `data` is `config.data`."""
    if task.format == "folder":
        return _folder(task, data.dir, split)
    return _hub(task, data, split)


def _files(root: str, split: str, folder: str) -> dict[str, str]:
    directory = os.path.join(root, split, folder)
    if not os.path.isdir(directory):
        raise DataError(
            f"{directory!r} does not exist; a segmentation folder holds "
            f"<data.dir>/<split>/{IMAGES_DIR}/ and <data.dir>/<split>/<data.mask_dir>/"
        )
    extensions = Image.registered_extensions()
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    return {
        os.path.splitext(n)[0]: os.path.join(directory, n)
        for n in names
        if os.path.splitext(n)[1].lower() in extensions
    }


def _file_split(paths: list[str], source: str) -> ImageSplit:
    return ImageSplit(
        labels=np.zeros(len(paths), np.int32),
        read=lambda i: Image.open(paths[i]),
        locate=lambda i: repr(paths[i]),
        source=source,
        check=lambda i: check_image_file(paths[i]),
    )


def _folder(task: SegmentationTask, root: str, split: str) -> SegmentationSplit:
    if not root:
        raise DataError(f"task {task.name} reads a folder: set data.dir")
    images = _files(root, split, IMAGES_DIR)
    masks = _files(root, split, task.mask_dir)
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        side = "mask" if unmatched[0] in images else "image"
        raise DataError(
            f"{os.path.join(root, split)}: {len(unmatched)} file(s) without a matching "
            f"{side}, e.g. {unmatched[0]!r}: every image in {IMAGES_DIR}/ needs a mask of "
            f"the same name in {task.mask_dir}/ (data.mask_dir)"
        )
    if not images:
        raise DataError(f"{os.path.join(root, split, IMAGES_DIR)!r} holds no images")
    stems = sorted(images)
    source = os.path.join(root, split)
    return SegmentationSplit(
        _file_split([images[s] for s in stems], source),
        _file_split([masks[s] for s in stems], source),
        source,
    )


def _hub(task: SegmentationTask, data: Any, split: str) -> SegmentationSplit:
    loaded, source = hub_dataset(data, split, task.name)
    columns = (data.image_column, task.mask_column)
    missing = [c for c in columns if c not in loaded.column_names]
    if missing:
        raise DataError(
            f"{source} lacks columns {missing} (data.image_column / data.mask_column); "
            f"it has {loaded.column_names}"
        )

    def column(name: str) -> ImageSplit:
        rows = loaded.select_columns([name])  # decodes only this column's image per row
        return ImageSplit(
            labels=np.zeros(len(loaded), np.int32),
            read=lambda i: rows[int(i)][name],
            locate=lambda i: f"{source} row {i} column {name!r}",
            source=source,
        )

    return SegmentationSplit(column(columns[0]), column(columns[1]), source)


def coco_class_names(path: str) -> tuple[str, ...]:
    """("background", then the COCO categories by id) from an annotations.json whose
    category ids are 1..K (the mask values of the folder format)."""
    try:
        with open(path, encoding="utf-8") as f:
            categories = json.load(f)["categories"]
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path!r}: no COCO categories (id, name) to name the classes: {e}") from e
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise DataError(
            f"{path!r}: category ids {sorted(by_id)} are not 1..{len(by_id)}, so they cannot "
            "be mask values; set data.label_names (index = mask value)"
        )
    return ("background", *(by_id[k] for k in sorted(by_id)))


def discover_class_names(task: SegmentationTask, data: Any) -> tuple[str, ...]:
    """Class names of a task that does not fix them: annotations.json beside the train
    images (folder format); otherwise an error asking for `data.label_names`."""
    path = os.path.join(data.dir, "train", "annotations.json")
    if task.format == "folder" and os.path.isfile(path):
        return coco_class_names(path)
    raise DataError(
        f"task {task.name}: name the classes in data.label_names (index = mask value, "
        f"0 = background){'; no ' + path if task.format == 'folder' else ''}"
    )
