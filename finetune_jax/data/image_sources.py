"""One split of an image task as labels plus images decoded on demand.

Formats (`ImageTask.format`):
  idx     `data.dir` holds the task's IDX files (Fashion-MNIST): images kept as raw uint8.
  folder  `data.dir/<split>/<class name>/<image file>`.
  table   `data.dir/<split>.csv` or `.jsonl` (or `data.dir` is one such file: the train
          split), columns `data.image_column` (a path, relative to the table's folder) and
          `data.label_column` (a class name or id).
  hub     an HF `datasets` dataset with an Image feature: `data.hub_name` by hub name, or
          `data.dir` saved with `save_to_disk`; images stay in its Arrow files.
  elpv    the `elpv-dataset` package's labels.csv + images (or a copy of them in `data.dir`).

Only labels (and, for IDX, the raw bytes) are held in memory; every image is decoded when a
batch needs it, so host memory does not grow with the split's size. Problems raise
`DataError` naming the file, the row or the key.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from finetune_jax.data import idx_files
from finetune_jax.data.text_sources import DataError

IMAGE_FORMATS = ("idx", "folder", "table", "hub", "elpv")


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """Image classification (see `data/image_sources.py` for the formats).

    Attributes:
      name: registry key.
      format: how the images are stored: "idx" (MNIST-style IDX files), "folder" (one
        sub-folder per class), "table" (CSV / JSONL of image paths + labels), "hub" (an HF
        `datasets` dataset with an Image feature) or "elpv" (the `elpv-dataset` package).
      label_names: class names, index = class id; None = taken from `data.label_names` or, when
        that is empty, discovered from the train split (sorted folder names / label values,
        or the dataset's ClassLabel names).
      files: split -> (images file, labels file), for the "idx" format: every split the
        dataset officially has; one whose files are not in `data.dir` is an error naming them.
      elpv_grades: for "elpv", defect probability -> class: False = defective (p >= 0.5)
        vs functional, True = the four levels 0, 1/3, 2/3, 1.
      subdir: conventional location of the files under the shared data root.
    """

    name: str
    format: str
    label_names: tuple[str, ...] | None = None
    files: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict, hash=False)
    elpv_grades: bool = False
    subdir: str = ""
    kind = "image_classification"
    problem_type = "single_label_classification"
    metrics = ("accuracy",)
    main_metric = "accuracy"
    is_regression = False
    is_multi_label = False
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV

    def __post_init__(self):
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"task {self.name}: format {self.format!r} not in {IMAGE_FORMATS}")

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: class names are not resolved yet (set data.label_names, or "
                "build the run's loader, which reads them from the train split)"
            )
        return len(self.label_names)


@dataclasses.dataclass
class ImageSplit:
    """Labels of one split and a way to decode each of its images.

    `read(i)` returns example i's image (any PIL mode; `image` converts to RGB);
    `locate(i)` says where it comes from, for error messages; `check(i)` raises when example
    i's file cannot be opened, without decoding its pixels (`image_checks` runs it over a
    split before training; None: nothing to check, as for IDX arrays and hub datasets).
    """

    labels: np.ndarray  # int32 [N]
    read: Callable[[int], Image.Image]
    locate: Callable[[int], str]
    source: str
    # Groups a stratified split (data.stratify) draws in proportion; None = the labels.
    strata: np.ndarray | None = None
    check: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Example i as an RGB image (greyscale is repeated over the three channels)."""
        try:
            image = self.read(i)
            return image if image.mode == "RGB" else image.convert("RGB")
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"{self.locate(i)}: could not decode the image: {e}") from e


def take(split: ImageSplit, rows: np.ndarray) -> ImageSplit:
    """The examples at `rows`, in that order."""
    rows = np.asarray(rows)
    check = split.check
    return ImageSplit(
        split.labels[rows],
        lambda i: split.read(int(rows[i])),
        lambda i: split.locate(int(rows[i])),
        split.source,
        None if split.strata is None else split.strata[rows],
        None if check is None else lambda i: check(int(rows[i])),
    )


def check_image_file(path: str) -> None:
    """Raises unless `path` opens as an image: its header parses (and, for PNG, every chunk's
    checksum holds). Reads the file but decodes no pixels (~0.3 ms for a 35 kB PNG)."""
    with Image.open(path) as image:
        image.verify()


@dataclasses.dataclass
class _Raw:
    """A split before its labels are mapped to class ids."""

    labels: list[Any]
    read: Callable[[int], Image.Image]
    locate: Callable[[int], str]
    source: str
    class_names: tuple[str, ...] | None = None  # what the source itself declares
    check: Callable[[int], None] | None = None


def load_split(task: ImageTask, data: Any, split: str, label_names: Sequence[str]) -> ImageSplit:
    """Split `split` of `task` with labels as ids into `label_names`; `data` is `config.data`."""
    if task.format == "idx":
        return _idx(task, data.dir, split)
    if task.format == "elpv":
        return _elpv(task, data.dir, split)
    raw = _raw(task, data, split)
    to_id = {str(name): i for i, name in enumerate(label_names)}
    labels = np.empty(len(raw.labels), np.int32)
    for i, value in enumerate(raw.labels):
        label_id = to_id.get(str(value))
        if label_id is None:
            raise DataError(
                f"{raw.locate(i)}: label {value!r} is not one of the task's classes "
                f"{list(label_names)} (set data.label_names to name every class)"
            )
        labels[i] = label_id
    return ImageSplit(labels, raw.read, raw.locate, raw.source, check=raw.check)


def discover_label_names(task: ImageTask, data: Any) -> tuple[str, ...]:
    """Class names read from the train split: the dataset's own (ClassLabel), else the
    sorted distinct labels (numerically when all are integers, so "10" follows "9")."""
    raw = _raw(task, data, "train")
    if raw.class_names is not None:
        return raw.class_names
    values = sorted({str(v) for v in raw.labels})
    if all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
    return tuple(values)


def _raw(task: ImageTask, data: Any, split: str) -> _Raw:
    readers = {"folder": _folder, "table": _table, "hub": _hub}
    if task.format not in readers:
        raise DataError(f"task {task.name}: format {task.format!r} declares its own classes")
    return readers[task.format](data, split)


def _idx(task: ImageTask, data_dir: str, split: str) -> ImageSplit:
    if not data_dir:
        raise DataError(f"task {task.name} reads IDX files: set data.dir (<data>/{task.subdir})")
    if split not in task.files:
        raise DataError(
            f"task {task.name} has no {split!r} split, only {sorted(task.files)}: hold rows out "
            "of train with data.holdout_rows=N and evaluate split 'holdout'"
        )
    paths = [_idx_file(data_dir, name) for name in task.files[split]]
    missing = [name for name, path in zip(task.files[split], paths) if path is None]
    if missing:
        holdout = "; or evaluate rows held out of train (data.holdout_rows=N, split 'holdout')"
        hint = "" if split == "train" else holdout
        raise DataError(
            f"task {task.name}'s {split!r} split reads {' and '.join(task.files[split])} "
            f"(gzipped or not) in data.dir={data_dir!r}, which lacks {', '.join(missing)}: "
            f"put the dataset's official {split} files there{hint}"
        )
    images, labels = idx_files.read_images_and_labels(*paths, len(task.label_names))
    return ImageSplit(
        labels,
        lambda i: Image.fromarray(images[i], mode="L"),
        lambda i: f"{paths[0]!r} image {i}",
        paths[0],
    )


def _idx_file(data_dir: str, name: str) -> str | None:
    """`data_dir/name`, or its decompressed twin (`name` without ".gz"); None if neither."""
    for candidate in (name, name.removesuffix(".gz")):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _image_files(directory: str) -> list[str]:
    extensions = Image.registered_extensions()
    return sorted(
        name
        for name in os.listdir(directory)
        if os.path.splitext(name)[1].lower() in extensions and not name.startswith(".")
    )


def _folder(data: Any, split: str) -> _Raw:
    root = os.path.join(data.dir, split)
    if not os.path.isdir(root):
        raise DataError(
            f"image folder {root!r} (data.dir/{split}) does not exist; expected "
            f"{data.dir}/{split}/<class name>/<image files>"
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for name in classes:
        for file_name in _image_files(os.path.join(root, name)):
            paths.append(os.path.join(root, name, file_name))
            labels.append(name)
    if not paths:
        raise DataError(f"image folder {root!r} holds no images in class sub-folders")
    return _Raw(
        labels,
        lambda i: Image.open(paths[i]),
        lambda i: repr(paths[i]),
        root,
        check=lambda i: check_image_file(paths[i]),
    )


def _table_path(data_dir: str, split: str) -> str:
    if os.path.isfile(data_dir):
        if split != "train":  # a lone file is the train split; never evaluate on it
            raise DataError(
                f"data.dir={data_dir!r} is a single file, the train split only, not "
                f"{split!r}: use a directory with {split}.csv, or data.eval_split='holdout'"
            )
        return data_dir
    for extension in (".csv", ".jsonl"):
        path = os.path.join(data_dir, split + extension)
        if os.path.isfile(path):
            return path
    raise DataError(f"no {split}.csv or {split}.jsonl in data.dir={data_dir!r}")


def _table_rows(path: str) -> tuple[list[dict[str, Any]], int]:
    """The rows of a CSV (header line) or JSONL file, and the line number of the first."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path!r} line {number}: not JSON: {e}") from e
            return rows, 1
        return list(csv.DictReader(f)), 2


def _table(data: Any, split: str) -> _Raw:
    path = _table_path(data.dir, split)
    rows, first_line = _table_rows(path)
    if not rows:
        raise DataError(f"{path!r} has no rows")
    base = os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    label_column = data.label_column or "label"
    for i, row in enumerate(rows):
        missing = [k for k in (data.image_column, label_column) if row.get(k) in (None, "")]
        if missing:
            raise DataError(
                f"{path!r} line {i + first_line}: no value for {missing} (found keys "
                f"{sorted(row)}; set data.image_column / data.label_column)"
            )
        paths.append(os.path.join(base, str(row[data.image_column])))
        labels.append(row[label_column])

    def locate(i: int) -> str:
        return f"{path!r} line {i + first_line} ({paths[i]!r})"

    return _Raw(
        labels,
        lambda i: Image.open(paths[i]),
        locate,
        path,
        check=lambda i: check_image_file(paths[i]),
    )


def _hub(data: Any, split: str) -> _Raw:
    loaded, source = hub_dataset(data, split, "image_hub")
    return hub_split(loaded, data.image_column, data.label_column or "label", source)


def hub_dataset(data: Any, split: str, task_name: str) -> tuple[Any, str]:
    """(split `split` of the HF dataset `config.data` names, its name in messages): `data.dir`
    written by `save_to_disk` (a DatasetDict, or one Dataset = the train split), else
    `data.hub_name` by hub name."""
    import datasets  # noqa: PLC0415 (heavy; only hub formats need it)

    if data.dir:
        loaded = datasets.load_from_disk(data.dir)
        source = f"{data.dir}[{split}]"
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{data.dir!r} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        elif split != "train":
            raise DataError(f"{data.dir!r} is one dataset (the train split), not {split!r}")
    elif data.hub_name:
        source = f"hub:{data.hub_name}[{split}]"
        loaded = datasets.load_dataset(data.hub_name, split=split)
    else:
        raise DataError(f"task {task_name} needs data.hub_name (or data.dir saved by save_to_disk)")
    return loaded, source


def hub_split(dataset, image_column: str, label_column: str, source: str) -> _Raw:
    """A `datasets.Dataset` with an Image column; images are decoded one row at a time."""
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{source} lacks columns {missing} (data.image_column / data.label_column); "
            f"it has {dataset.column_names}"
        )
    feature = dataset.features[label_column]
    names = tuple(feature.names) if hasattr(feature, "names") else None
    labels = dataset[label_column]
    if names is not None:
        labels = [names[v] for v in labels]
    images = dataset.select_columns([image_column])
    return _Raw(
        list(labels),
        lambda i: images[int(i)][image_column],
        lambda i: f"{source} row {i}",
        source,
        names,
    )


_ELPV_TYPES = ("mono", "poly")


def _elpv(task: ImageTask, data_dir: str, split: str) -> ImageSplit:
    """ELPV: `labels.csv` rows `images/cellNNNN.png <defect probability> <mono|poly>`."""
    if split != "train":
        raise DataError(
            f"ELPV is one set of 2,624 cells, not split {split!r}: evaluate a holdout "
            "(data.holdout_rows=N, data.eval_split='holdout')"
        )
    root = data_dir or _elpv_package_dir()
    path = os.path.join(root, "labels.csv")
    if not os.path.isfile(path):
        raise DataError(f"ELPV labels {path!r} are missing (pip install elpv-dataset)")
    paths, labels, strata = [], [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            try:
                probability = float(fields[1])
                grade = round(probability * 3)
            except (IndexError, ValueError):
                raise DataError(
                    f"{path!r} line {number}: expected 'path probability type'"
                ) from None
            if abs(probability * 3 - grade) > 1e-6 or not 0 <= grade <= 3:
                raise DataError(f"{path!r} line {number}: probability {probability} not k/3")
            cell_type = fields[2] if len(fields) > 2 else ""
            if cell_type not in _ELPV_TYPES:
                raise DataError(
                    f"{path!r} line {number}: cell type {cell_type!r} is not one of "
                    f"{list(_ELPV_TYPES)}"
                )
            paths.append(os.path.join(root, fields[0]))
            # Binary: the cells rated likelier defective than not (p >= 2/3) are defective.
            labels.append(grade if task.elpv_grades else int(grade >= 2))
            # Grade x type: the binary and the 4-grade task draw the same stratified split.
            strata.append(grade * len(_ELPV_TYPES) + _ELPV_TYPES.index(cell_type))
    return ImageSplit(
        np.asarray(labels, np.int32),
        lambda i: Image.open(paths[i]),
        lambda i: f"{path!r} line {i + 1} ({paths[i]!r})",
        path,
        np.asarray(strata, np.int32),
        lambda i: check_image_file(paths[i]),
    )


def _elpv_package_dir() -> str:
    # Found without importing: the package's __init__ would be harmless, but loads nothing
    # we need (its load_dataset decodes all 2,624 images at once).
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("ELPV needs the elpv-dataset package: pip install elpv-dataset")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")
