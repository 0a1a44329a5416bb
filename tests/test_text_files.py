"""Config-driven text tasks on your own files: every format, string labels inferred from
train, multi-label and regression cells, chunked reading, and errors that name file and row."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from finetune_jax import tasks
from finetune_jax.config import base_config
from finetune_jax.data import chat_loader, text_loader, text_sources, text_tasks
from finetune_jax.data.text_sources import DataError, iter_split_chunks, load_split
from tests.helpers import SHARED_DATA

ROWS = [  # (text, label, multi-label names, score)
    ("the invoice was charged twice", "billing", ["billing", "urgent"], 0.5),
    ('my "router" keeps, dropping wifi', "technical", ["technical"], 2.0),
    ("where is my parcel", "shipping", ["shipping", "urgent"], 1.25),
    ("refund the extra payment", "billing", [], 3.0),
    ("the app crashes at login", "technical", ["technical", "urgent"], 4.0),
]


def _write_rows(directory: Path, fmt: str, rows=ROWS, name: str = "train") -> Path:
    """`rows` as one file of `fmt`; multi-label as a list (jsonl / parquet) or "a|b" cell."""
    records = [
        {"text": t, "label": label, "labels": names, "score": score}
        for t, label, names, score in rows
    ]
    path = directory / f"{name}.{fmt}"
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(records[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows({**r, "labels": "|".join(r["labels"])} for r in records)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def _task(name="text_classification", **data):
    config = base_config()
    config.data.task = name
    for key, value in data.items():
        if key in text_sources.SPLITS:
            config.data.files[key] = value
        else:
            config.data[key] = value
    return tasks.task_for(config.data), config


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    path = _write_rows(tmp_path, fmt)
    task, config = _task(train=str(path))
    assert task.format == fmt  # from the extension
    task = text_loader.resolve_text_task(config, task)
    assert task.label_names == ("billing", "shipping", "technical")  # sorted unique
    examples = load_split(task, None, "train")
    assert examples.text_a == [r[0] for r in ROWS]  # quotes and commas kept
    assert [task.label_names[i] for i in examples.labels] == [r[1] for r in ROWS]
    assert examples.labels.dtype == np.int32 and examples.source == str(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_multi_label_cells_become_multi_hot(tmp_path, fmt):
    _write_rows(tmp_path, fmt)
    task, config = _task("multi_label", dir=str(tmp_path), train=f"train.{fmt}")
    task = text_loader.resolve_text_task(config, task)
    assert task.label_names == ("billing", "shipping", "technical", "urgent")
    labels = load_split(task, tmp_path, "train").labels
    expected = [[name in names for name in task.label_names] for _, _, names, _ in ROWS]
    np.testing.assert_array_equal(labels, np.asarray(expected, np.float32))
    assert labels.dtype == np.float32 and task.num_labels == 4


def test_regression_scores_and_range(tmp_path):
    path = _write_rows(tmp_path, "csv")
    task, _ = _task("regression", train=str(path), label_column="score", label_range=(0, 3))
    with pytest.raises(
        DataError, match=r"train.csv' line 6: score '4.0' is not a number in \[0.0, 3.0\]"
    ):
        load_split(task, None, "train")
    task, _ = _task("regression", train=str(path), label_column="score")
    np.testing.assert_array_equal(load_split(task, None, "train").labels, [r[3] for r in ROWS])


def test_given_label_names_fix_the_ids_and_reject_unknown_labels(tmp_path):
    path = _write_rows(tmp_path, "jsonl")
    task, config = _task(train=str(path), label_names=("technical", "billing", "shipping"))
    assert text_loader.resolve_text_task(config, task) == task
    assert load_split(task, None, "train").labels.tolist() == [1, 0, 2, 1, 0]
    task, _ = _task(train=str(path), label_names=("technical", "billing"))
    with pytest.raises(DataError, match=r"train.jsonl' line 3: label 'shipping' is not one of"):
        load_split(task, None, "train")


def test_saved_label_names_win_over_inference_and_conflicts_are_named(tmp_path):
    path = _write_rows(tmp_path, "csv")
    task, config = _task(train=str(path))
    saved = ("technical", "shipping", "billing")
    assert text_loader.resolve_text_task(config, task, saved).label_names == saved
    task, config = _task(train=str(path), label_names=("billing", "shipping", "technical"))
    with pytest.raises(ValueError, match="trained with class names .* label_names.json"):
        text_loader.resolve_text_task(config, task, saved)


def test_integer_labels_infer_in_numeric_order(tmp_path):
    rows = [(f"row {i}", str(label), [], 0.0) for i, label in enumerate([10, 2, 1, 2])]
    task, config = _task(train=str(_write_rows(tmp_path, "csv", rows)))
    assert text_loader.resolve_text_task(config, task).label_names == ("1", "2", "10")


def test_wrong_column_is_named_with_the_columns_found(tmp_path):
    path = _write_rows(tmp_path, "parquet")
    task, config = _task(train=str(path), text_columns=("body",))
    with pytest.raises(
        DataError, match=r"train.parquet' lacks columns \['body'\] .*data.text_columns"
    ):
        text_loader.resolve_text_task(config, task)


def test_bad_text_in_a_parquet_row_names_the_row(tmp_path):
    rows = [*ROWS[:2], (None, "billing", [], 0.0)]
    task, _ = _task(
        train=str(_write_rows(tmp_path, "parquet", rows)), label_names=("billing", "technical")
    )
    with pytest.raises(DataError, match=r"train.parquet' row 3: column 'text' is missing"):
        load_split(task, None, "train")


def test_chunks_concatenate_to_the_split_across_a_glob(tmp_path):
    _write_rows(tmp_path, "csv", ROWS[:3], name="part-0")
    _write_rows(tmp_path, "csv", ROWS[3:], name="part-1")
    task, config = _task(dir=str(tmp_path), train="part-*.csv")
    task = text_loader.resolve_text_task(config, task)
    chunks = list(iter_split_chunks(task, tmp_path, "train", 2))
    assert [len(c) for c in chunks] == [2, 1, 2]  # per file, in file order
    whole = load_split(task, tmp_path, "train")
    assert [t for c in chunks for t in c.text_a] == whole.text_a == [r[0] for r in ROWS]
    np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), whole.labels)


def test_missing_split_and_missing_file_say_which_key(tmp_path):
    path = _write_rows(tmp_path, "csv")
    task, config = _task(train=str(path), label_names=("billing", "shipping", "technical"))
    with pytest.raises(DataError, match="no 'validation' split: set data.files.validation"):
        load_split(task, None, "validation")
    task, _ = _task(train=str(tmp_path / "nope.csv"), label_names=("a", "b"))
    with pytest.raises(
        DataError, match=r"nope.csv' \(data.files.train\) .* is missing; files present"
    ):
        load_split(task, None, "train")


def test_a_local_dataset_dir_loads_as_a_hub_dataset(tmp_path):
    # `load_dataset(<name>)` also takes a directory: the hub path without the network,
    # with its ClassLabel names as the class names.
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {"text": ["bad", "good", "fine"], "label": [0, 1, 1]}
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "hub" / "train.parquet")
    )
    task, config = _task(format="hub", hub_name=str(tmp_path / "hub"))
    task = text_loader.resolve_text_task(config, task)
    assert task.label_names == ("neg", "pos")
    assert load_split(task, None, "train").labels.tolist() == [0, 1, 1]


def _reference_glue_rows(task: text_tasks.Task, path: Path) -> tuple[list, list]:
    """The previous registry's reading of a GLUE file, by plain `csv`: tab-separated, no
    quoting, BOM stripped, texts stripped, raw labels mapped through the preset."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = list(task.column_names) if not task.has_header else rows.pop(0)
    records = [dict(zip(names, row)) for row in rows]
    texts = [[r[c].strip() for c in task.text_columns] for r in records]
    if task.is_regression:
        return texts, [np.float32(r[task.label_column]) for r in records]
    return texts, [task.label_to_id[r[task.label_column]] for r in records]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize("name", sorted(text_tasks.PRESETS))
def test_presets_read_exactly_what_the_previous_registry_read(name):
    config = base_config()
    config.data.task, config.data.dir = name, str(SHARED_DATA / text_tasks.PRESETS[name].subdir)
    task = tasks.task_for(config.data)
    assert task == text_tasks.PRESETS[name]  # data.dir alone changes nothing of the preset
    config.data.format = "tsv"  # nor does naming the preset's own format
    assert tasks.task_for(config.data) == task
    examples = load_split(task, config.data.dir, "validation")
    texts, labels = _reference_glue_rows(task, Path(config.data.dir) / task.files["validation"])
    assert examples.text_a == [t[0] for t in texts]
    assert examples.text_b == ([t[1] for t in texts] if task.is_pair else None)
    np.testing.assert_array_equal(examples.labels, np.asarray(labels, examples.labels.dtype))


def test_presets_without_a_dir_use_the_hub_and_with_files_become_plain_files(tmp_path):
    config = base_config()
    config.data.task = "sst2"
    assert tasks.task_for(config.data).format == "hub"
    config.data.files.train = str(_write_rows(tmp_path, "csv"))
    config.data.text_columns = ("text",)
    config.data.label_names = ("billing", "shipping", "technical")
    task = tasks.task_for(config.data)
    assert (task.format, task.quote_none, task.raw_labels) == ("csv", False, None)
    assert load_split(task, None, "train").labels.tolist() == [0, 2, 1, 0, 2]


def test_chat_tasks_read_data_files_per_split(tmp_path):
    records = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(3)]
    for split, rows in (("qa-train", records[:2]), ("qa-dev", records[2:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config()
    config.data.task, config.data.dir = "gsm8k", str(tmp_path)
    config.data.files.train, config.data.files.validation = "qa-train.jsonl", "qa-dev.jsonl"
    data = chat_loader.ChatData(config, tasks.task_for(config.data), tokenizer=None)
    assert [c[0]["content"] for c in data.conversations("train")] == [
        "What is 0 + 1?",
        "What is 1 + 1?",
    ]
    assert data.conversations("validation")[0][1]["content"] == "#### 3"
    config.data.dir = ""  # files only: a split without one is an error naming its key
    data = chat_loader.ChatData(config, tasks.task_for(config.data), tokenizer=None)
    with pytest.raises(ValueError, match="no test records: set data.files.test"):
        data.conversations("test")


def test_format_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.format='xlsx'.*expected one of"):
        _task(train="a.csv", format="xlsx")
    with pytest.raises(ValueError, match="cannot tell the format of 'a.txt'.*set data.format"):
        _task(train="a.txt")
    with pytest.raises(ValueError, match="data.text_columns=.*name 1 or 2 columns"):
        _task(train="a.csv", text_columns=("a", "b", "c"))


def test_an_unquoted_comma_in_the_first_row_is_an_error_not_a_shifted_row(tmp_path):
    # pandas' parser took the first field of a row with one field too many as an index: the
    # text lost "I did not expect to like it" and every later row moved one column left.
    path = tmp_path / "train.csv"
    path.write_text("text,label\nI did not expect to like it, but I loved it,pos\nbad,neg\n")
    task, _ = _task(train=str(path), label_names=("neg", "pos"))
    with pytest.raises(DataError, match=r"train\.csv' line 2 as csv: 3 fields, but the header"):
        load_split(task, None, "train")


def test_rows_after_a_cell_spanning_lines_are_named_by_their_own_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",pos\nfine,pos\nodd,maybe\n')
    task, _ = _task(train=str(path), label_names=("neg", "pos"))
    with pytest.raises(DataError, match=r"train\.csv' line 5: label 'maybe'"):
        load_split(task, None, "train")


@pytest.mark.parametrize("fmt,line", [("csv", 4), ("jsonl", 3)])  # csv: a header line
def test_an_empty_text_is_an_error_naming_its_line(tmp_path, fmt, line):
    rows = [*ROWS[:2], ("   ", "billing", [], 0.0), *ROWS[3:]]
    task, _ = _task(train=str(_write_rows(tmp_path, fmt, rows)))
    task = dataclasses.replace(task, label_names=("billing", "shipping", "technical"))
    with pytest.raises(
        DataError, match=rf"train\.{fmt}' line {line}: column 'text' is empty; fill or remove"
    ):
        load_split(task, None, "train")


def test_a_broken_jsonl_line_is_named_by_its_file_line_once(tmp_path, capfd):
    lines = [json.dumps({"text": f"row {i}", "label": "billing"}) for i in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([*lines, "", '{"text": "broken', lines[0]]) + "\n")
    task, _ = _task(train=str(path), label_names=("billing", "shipping"))
    with pytest.raises(DataError) as error:
        load_split(task, None, "train")
    assert str(error.value).startswith(f"{str(path)!r} line 10: not valid JSON (Unterminated")
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own log: silenced


def test_a_later_byte_that_is_not_utf8_names_its_line(tmp_path):
    body = "".join(f"row {i},billing\n" for i in range(1500)).encode()
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\n" + body + b"caf\xe9,billing\n")
    task, _ = _task(train=str(path), label_names=("billing", "shipping"))
    with pytest.raises(DataError, match=r"train\.csv' line 1502, byte \d+: b'\\xe9' is not UTF-8"):
        load_split(task, None, "train")


def test_rows_after_a_blank_jsonl_line_are_named_by_their_own_line(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a", "label": "billing"}, {"text": "b", "label": "maybe"}]
    path.write_text(json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    task, _ = _task(train=str(path), label_names=("billing", "shipping"))
    with pytest.raises(DataError, match=r"train\.jsonl' line 4: label 'maybe'"):
        load_split(task, None, "train")
