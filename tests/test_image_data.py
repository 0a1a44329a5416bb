"""Image data contracts: the IDX reader, folder / table / hub sources and their errors,
preprocessing equal to transformers' image processor, seeded augmentation, resumable batches."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from PIL import Image

from finetune_jax.config import base_config
from finetune_jax.data import (
    idx_files,
    image_batches,
    image_checks,
    image_preprocess,
    image_sources,
)
from finetune_jax.data.image_loader import ImageData, resolve_task
from finetune_jax.data.text_sources import DataError
from finetune_jax.tasks import get_task
from finetune_jax.training import builder


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _image(seed: int, size=(20, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.fixture
def processor(tmp_path):
    """A DINOv2-style processor (shortest edge 256 -> crop 224), written as a model dir has it."""
    transformers.BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(tmp_path)
    return image_preprocess.load_processor(str(tmp_path), image_size=28)


def test_idx_reader_reads_a_written_file_and_names_bad_ones(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels", np.array([2, 0, 1]))
    got_images, labels = idx_files.read_images_and_labels(
        tmp_path / "images.gz", tmp_path / "labels", num_labels=3
    )
    np.testing.assert_array_equal(got_images, images)
    assert labels.dtype == np.int32 and labels.tolist() == [2, 0, 1]
    with pytest.raises(idx_files.IdxError, match="row 0: label 2"):
        idx_files.read_images_and_labels(tmp_path / "images.gz", tmp_path / "labels", 2)
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(idx_files.IdxError, match="short.*9 values.*2 bytes"):
        idx_files.read_idx(tmp_path / "short")


def _data(**values):
    config = base_config()
    for key, value in values.items():
        config.data[key] = value
    return config


def test_fashion_mnist_task_reads_idx_and_holds_out_rows(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    config = _data(task="fashion_mnist", dir=str(tmp_path), holdout_rows=5, split_seed=3)
    data = ImageData(config, get_task("fashion_mnist"), processor=_FakeProcessor())
    train, holdout = data.load("train"), data.load("holdout")
    assert (len(train), len(holdout)) == (15, 5)
    assert train.image(0).mode == "RGB" and train.image(0).size == (28, 28)
    with pytest.raises(DataError, match="no 'validation' split.*holdout"):
        data.load("validation")


class _FakeProcessor:
    do_center_crop, size = False, {"height": 28, "width": 28}


def test_fashion_mnist_offers_its_official_test_split_when_the_files_are_there(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    config = _data(task="fashion_mnist", dir=str(tmp_path))
    data = ImageData(config, get_task("fashion_mnist"), processor=_FakeProcessor())
    with pytest.raises(DataError, match=r"'test' split reads t10k-images.*lacks t10k-images"):
        data.load("test")
    test_images = np.arange(6 * 28 * 28).reshape(6, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 1, 2, 3, 4]))  # unzipped
    test = data.load("test")
    assert test.labels.tolist() == [9, 0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(test.read(5)), test_images[5])


def test_max_eval_rows_caps_an_image_holdout(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((40, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    config = _data(task="fashion_mnist", dir=str(tmp_path), holdout_rows=20, max_eval_rows=5)
    data = ImageData(config, get_task("fashion_mnist"), processor=_FakeProcessor())
    assert (len(data.load("holdout")), len(data.load("train"))) == (5, 20)


def test_folder_and_table_sources_agree_and_name_bad_rows(tmp_path):
    rows = []
    for i, name in enumerate(["cat", "dog", "cat", "dog", "bird"]):
        (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
        _image(i).save(tmp_path / "train" / name / f"{i}.png")
        rows.append({"path": f"train/{name}/{i}.png", "label": name})
    lines = "path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows)
    (tmp_path / "train.csv").write_text(lines)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = _data(task="image_folder", dir=str(tmp_path))
    table = _data(task="image_table", dir=str(tmp_path / "train.csv"), image_column="path")
    names = resolve_task(folder, get_task("image_folder")).label_names
    assert names == ("bird", "cat", "dog")
    assert resolve_task(table, get_task("image_table")).label_names == names
    a = image_sources.load_split(get_task("image_folder"), folder.data, "train", names)
    b = image_sources.load_split(get_task("image_table"), table.data, "train", names)
    order = np.argsort([r["path"] for r in rows])  # the folder lists class by class
    assert a.labels.tolist() == b.labels[order].tolist()
    assert np.array_equal(np.asarray(a.image(0)), np.asarray(b.image(int(order[0]))))

    (tmp_path / "bad.csv").write_text("path,label\ntrain/cat/0.png,cat\ntrain/cat/0.png,\n")
    bad = _data(task="image_table", dir=str(tmp_path / "bad.csv"), image_column="path")
    with pytest.raises(DataError, match=r"bad.csv' line 3: no value for \['label'\]"):
        image_sources.load_split(get_task("image_table"), bad.data, "train", names)
    with pytest.raises(DataError, match=r"line 2.*'fish' is not one of"):
        (tmp_path / "fish.csv").write_text("path,label\ntrain/cat/0.png,fish\n")
        fish = _data(task="image_table", dir=str(tmp_path / "fish.csv"), image_column="path")
        image_sources.load_split(get_task("image_table"), fish.data, "train", names)
    with pytest.raises(DataError, match="single file.*not 'validation'"):
        image_sources.load_split(get_task("image_table"), table.data, "validation", names)


def test_a_runs_saved_class_names_win_over_discovery(tmp_path):
    for i, name in enumerate(("cat", "dog")):
        (tmp_path / "train" / name).mkdir(parents=True)
        _image(i).save(tmp_path / "train" / name / f"{i}.png")
    folder = _data(task="image_folder", dir=str(tmp_path))
    assert resolve_task(folder, get_task("image_folder")).label_names == ("cat", "dog")
    saved = ("dog", "cat")  # what an earlier run in the workdir trained with
    assert resolve_task(folder, get_task("image_folder"), saved).label_names == saved
    named = _data(task="image_folder", dir=str(tmp_path), label_names=("cat", "dog"))
    with pytest.raises(ValueError, match="trained with class names .*label_names.json"):
        resolve_task(named, get_task("image_folder"), saved)


def _folder_with_bad_images(root, good=6, bad=()):
    """root/train/<cat|dog>/<i>.png: `good` real PNGs, then the (name, bytes) pairs of `bad`."""
    for i in range(good):
        (root / "train" / ("cat", "dog")[i % 2]).mkdir(parents=True, exist_ok=True)
        _image(i).save(root / "train" / ("cat", "dog")[i % 2] / f"{i}.png")
    for name, data in bad:
        (root / "train" / "cat" / name).write_bytes(data)


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_images_stop_the_split_load_naming_every_one(tmp_path):
    bad = [("a_text.png", b"not an image"), ("b_cut.png", _png_bytes(9)[:-40])]
    _folder_with_bad_images(tmp_path, bad=bad)
    config = _data(task="image_folder", dir=str(tmp_path))
    data = ImageData(config, get_task("image_folder"), processor=_FakeProcessor())
    with pytest.raises(DataError) as raised:
        data.load("train")
    message = str(raised.value)
    assert message.startswith("2 of 8 train images cannot be read: ")
    assert "a_text.png': not an image file PIL recognises" in message
    assert "b_cut.png'" in message and "data.bad_images='skip'" in message


def test_a_table_row_naming_a_missing_file_is_found_with_its_line(tmp_path):
    _folder_with_bad_images(tmp_path, good=2)
    (tmp_path / "train.csv").write_text("path,label\ntrain/cat/0.png,cat\ngone.png,dog\n")
    config = _data(task="image_table", dir=str(tmp_path), image_column="path")
    data = ImageData(config, get_task("image_table"), processor=_FakeProcessor())
    with pytest.raises(DataError, match=r"1 of 2 .* line 3 \(.*gone.png'\): No such file"):
        data.load("train")


def test_skip_leaves_unreadable_images_out_with_a_count(tmp_path, capsys):
    _folder_with_bad_images(tmp_path, bad=[("a_text.png", b"not an image")])
    config = _data(task="image_folder", dir=str(tmp_path), bad_images="skip")
    data = ImageData(config, get_task("image_folder"), processor=_FakeProcessor())
    train = data.load("train")
    assert len(train) == 6 and all(".png" in train.locate(i) for i in range(6))
    assert "a_text.png" not in " ".join(train.locate(i) for i in range(6))
    warning = capsys.readouterr().err
    assert "warning: 1 of 7 train images cannot be read and are left out" in warning
    assert len(data.load("train")) == 6 and capsys.readouterr().err == ""  # checked once


def test_many_unreadable_images_are_counted_past_the_named_ones(tmp_path):
    bad = [(f"x{i:02d}.png", b"") for i in range(image_checks.NAMED + 5)]
    _folder_with_bad_images(tmp_path, bad=bad)
    config = _data(task="image_folder", dir=str(tmp_path))
    data = ImageData(config, get_task("image_folder"), processor=_FakeProcessor())
    with pytest.raises(DataError) as raised:
        data.load("train")
    assert str(raised.value).count(".png'") == image_checks.NAMED
    assert "; and 5 more." in str(raised.value)


def test_bad_images_takes_error_or_skip_checked_before_anything_loads(tmp_path):
    config = _data(task="image_folder", dir=str(tmp_path), bad_images="drop")
    config.model.name = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(ValueError, match=r"data.bad_images='drop': expected 'error'.*'skip'"):
        builder.build(config)


def test_hub_source_decodes_an_image_feature_dataset(tmp_path):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])}
    )
    table = {"image": [_image(i, mode="L") for i in range(4)], "label": [0, 1, 1, 0]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(table, features=features)}
    ).save_to_disk(str(tmp_path / "saved"))
    config = _data(task="image_hub", dir=str(tmp_path / "saved"))
    task = resolve_task(config, get_task("image_hub"))
    assert task.label_names == ("no", "yes")
    split = image_sources.load_split(task, config.data, "train", task.label_names)
    assert split.labels.tolist() == [0, 1, 1, 0]
    image = split.image(2)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 1], np.asarray(_image(2, mode="L")))
    with pytest.raises(DataError, match="splits \\['train'\\], not 'validation'"):
        image_sources.load_split(task, config.data, "validation", task.label_names)


def test_preprocessing_equals_transformers_image_processor(processor, tmp_path):
    images = [_image(0, (40, 30)), _image(1, (17, 50), mode="L").convert("RGB")]
    ours = image_preprocess.pixel_values(processor, images)
    # The same processor class, configured as the run asks, straight from transformers.
    reference = transformers.BitImageProcessor.from_pretrained(tmp_path)(
        images,
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        return_tensors="np",
    )["pixel_values"]
    assert ours.shape == (2, 28, 28, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference.transpose(0, 2, 3, 1), atol=1e-6)


def test_augmentation_is_seeded_per_epoch_and_example(processor):
    split = image_sources.ImageSplit(
        np.arange(4, dtype=np.int32) % 2,
        lambda i: _image(i, (40, 36)),
        lambda i: f"image {i}",
        "memory",
    )
    augment = image_preprocess.Augment()

    def batch(epoch):
        return image_batches.collate(split, np.arange(4), processor, augment, 7, epoch)

    a, b, c = batch(0), batch(0), batch(1)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    plain = image_batches.collate(split, np.arange(4), processor)
    assert not np.array_equal(a["pixel_values"], plain["pixel_values"])
    padded = image_batches.collate(split, np.array([1, -1]), processor)
    assert padded["weights"].tolist() == [1.0, 0.0] and not padded["pixel_values"][1].any()


def test_train_batches_resume_exactly_with_prefetch(processor):
    split = image_sources.ImageSplit(
        np.arange(10, dtype=np.int32) % 3, lambda i: _image(i), lambda i: str(i), "memory"
    )
    make = lambda: image_batches.ImageTrainBatches(  # noqa: E731
        split, processor, 4, seed=1, augment=image_preprocess.Augment()
    )
    straight = make()
    expected = [next(straight) for _ in range(5)]  # crosses two epoch ends
    first = make()
    for _ in range(3):
        next(first)
    resumed = make()
    resumed.restore(json.loads(json.dumps(first.state())))
    for want in expected[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset is not installed"
)
@pytest.mark.parametrize("task_name", ["elpv_binary", "elpv_grades"])
def test_elpv_source_matches_the_packages_own_loader(task_name):
    """Labels and pixels of the ELPV source equal what `elpv_dataset.utils.load_dataset`
    reads: grades are the defect probability x 3, binary is 'defective' for p >= 2/3."""
    from elpv_dataset.utils import load_dataset  # noqa: PLC0415

    images, probabilities, _ = load_dataset()
    task = get_task(task_name)
    split = image_sources.load_split(task, base_config().data, "train", task.label_names)
    grades = np.rint(probabilities * 3).astype(np.int32)
    want = grades if task_name == "elpv_grades" else (grades >= 2).astype(np.int32)
    np.testing.assert_array_equal(split.labels, want)
    for i in (0, len(split) // 2, len(split) - 1):
        rgb = np.asarray(split.image(i))
        assert rgb.shape == (*images[i].shape, 3)
        for channel in range(3):  # greyscale repeated over the channels
            np.testing.assert_array_equal(rgb[..., channel], images[i])


def test_image_holdout_is_stratified_by_class_when_asked(tmp_path):
    labels = np.repeat([0, 1, 2], [24, 8, 8])  # a file sorted by class, 60/20/20
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((40, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    config = _data(task="fashion_mnist", dir=str(tmp_path), holdout_rows=10, stratify=True)
    data = ImageData(config, get_task("fashion_mnist"), processor=_FakeProcessor())
    np.testing.assert_array_equal(np.bincount(data.load("holdout").labels), [6, 2, 2])
    np.testing.assert_array_equal(np.bincount(data.load("train").labels), [18, 6, 6])


def _elpv_config(labels: str):
    path = Path(__file__).resolve().parents[1] / "configs" / "vision" / "elpv_dinov2.py"
    spec = importlib.util.spec_from_file_location("elpv_dinov2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"{labels},full")


@pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset is not installed"
)
def test_elpv_binary_and_grades_share_one_split_stratified_by_grade_and_type():
    """The ELPV config's holdout keeps each (grade, mono/poly) group's share to within a
    row, and the binary and the 4-grade task hold out the very same cells."""
    held = {}
    for labels in ("binary", "grades"):
        config = _elpv_config(labels)
        data = ImageData(config, get_task(config.data.task), processor=_FakeProcessor())
        held[labels] = data.load("holdout")
    cells = {k: [split.locate(i) for i in range(len(split))] for k, split in held.items()}
    assert len(cells["grades"]) == config.data.holdout_rows
    assert cells["binary"] == cells["grades"]
    task = get_task("elpv_grades")
    every = image_sources.load_split(task, config.data, "train", task.label_names)
    want = np.bincount(every.strata) * config.data.holdout_rows / len(every)
    got = np.bincount(held["grades"].strata, minlength=len(want))
    assert np.all(np.abs(got - want) < 1), (got, want)
