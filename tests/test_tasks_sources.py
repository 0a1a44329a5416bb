"""Task registry and split loading: real shared GLUE/Rotten Tomatoes files and broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune_jax import tasks
from finetune_jax.data import text_sources, text_tasks
from finetune_jax.data.text_sources import DataError, load_split
from tests.helpers import SHARED_DATA

DATA_ROOT = SHARED_DATA

pytestmark = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"shared data not at {DATA_ROOT}")

# (task, split, rows, {label id: count}) — the contract from shared/data/README.md.
EXPECTED = [
    ("sst2", "train", 67349, {0: 29780, 1: 37569}),
    ("sst2", "validation", 872, {0: 428, 1: 444}),
    ("mrpc", "train", 3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation", 408, {0: 129, 1: 279}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),  # entailment = 0
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("cola", "train", 8551, {0: 2528, 1: 6023}),
    ("cola", "validation", 1043, {0: 322, 1: 721}),
    ("stsb", "train", 5749, None),
    ("stsb", "validation", 1500, None),
    ("rotten_tomatoes", "train", 8530, {0: 4265, 1: 4265}),
    ("rotten_tomatoes", "validation", 1066, {0: 533, 1: 533}),
    ("rotten_tomatoes", "test", 1066, {0: 533, 1: 533}),
]

# (task, split, first text_a, first text_b, first label)
FIRST_ROWS = [
    ("sst2", "train", "hide new secretions from the parental units", None, 0),
    ("sst2", "validation", "it 's a charming and often affecting journey .", None, 1),
    (
        "mrpc",
        "train",
        'Amrozi accused his brother, whom he called "the witness", of deliberately '
        "distorting his evidence.",
        'Referring to him as only "the witness", Amrozi accused his '
        "brother of deliberately distorting his evidence.",
        1,
    ),
    ("rte", "validation", None, "Christopher Reeve had an accident.", 1),
    ("cola", "validation", "The sailors rode the breeze clear of the rocks.", None, 1),
    ("stsb", "train", "A plane is taking off.", "An air plane is taking off.", 5.0),
    ("rotten_tomatoes", "test", None, None, 1),
]


def _task_dir(name: str) -> Path:
    return DATA_ROOT / tasks.get_task(name).subdir


@pytest.mark.parametrize("name,split,rows,label_counts", EXPECTED)
def test_real_split_row_counts_and_labels(name, split, rows, label_counts):
    task = tasks.get_task(name)
    examples = load_split(task, _task_dir(name), split)
    assert len(examples) == rows
    assert len(examples.labels) == rows
    assert (examples.text_b is not None) == task.is_pair
    if examples.text_b is not None:
        assert len(examples.text_b) == rows
    if label_counts is None:  # regression
        assert examples.labels.dtype == np.float32
        assert examples.labels.min() >= 0.0 and examples.labels.max() <= 5.0
    else:
        assert examples.labels.dtype == np.int32
        ids, counts = np.unique(examples.labels, return_counts=True)
        assert dict(zip(ids.tolist(), counts.tolist())) == label_counts
    # Stripped, non-empty texts (SST-2 sentences end with a space in the file).
    for texts in (examples.text_a, examples.text_b or []):
        assert all(t and t == t.strip() for t in texts)
    assert examples.source.endswith(task.files[split])


@pytest.mark.parametrize("name,split,text_a,text_b,label", FIRST_ROWS)
def test_real_split_first_row(name, split, text_a, text_b, label):
    examples = load_split(tasks.get_task(name), _task_dir(name), split)
    if text_a is not None:
        assert examples.text_a[0] == text_a
    if text_b is not None:
        assert examples.text_b[0] == text_b
    assert examples.labels[0] == label


def test_quotes_are_kept_verbatim():
    # MRPC dev row 1's second sentence opens a quote it never closes; QUOTE_NONE keeps it.
    examples = load_split(tasks.get_task("mrpc"), _task_dir("mrpc"), "validation")
    assert examples.text_b[0].startswith('"The foodservice pie business')
    assert examples.text_a[0].startswith("He said the foodservice pie business")


def test_registry_and_task_properties():
    assert set(text_tasks.PRESETS) == {"sst2", "mrpc", "rte", "cola", "stsb", "rotten_tomatoes"}
    assert set(text_tasks.TASKS) == {
        *text_tasks.PRESETS,
        "text_classification",
        "multi_label",
        "regression",
    }
    assert tasks.get_task("stsb").num_labels == 1 and tasks.get_task("stsb").is_regression
    assert tasks.get_task("rte").label_to_id == {"entailment": 0, "not_entailment": 1}
    assert tasks.get_task("mrpc").label_to_id == {"0": 0, "1": 1}
    for task in text_tasks.PRESETS.values():
        assert task.main_metric in task.metrics
        assert task.num_labels == (1 if task.label_names is None else len(task.label_names))
    with pytest.raises(ValueError, match=r"unknown task 'qqp' \(data.task\); known tasks: ") as e:
        tasks.get_task("qqp")
    registries = [kind.tasks for kind in tasks.KINDS.values()]
    named = str(e.value).split("known tasks: ")[1].split(", ")
    assert named == sorted(name for registry in registries for name in registry)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_label_names_file_and_line(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood film \t1\nbad film\t7\n")
    with pytest.raises(DataError) as info:
        load_split(tasks.get_task("sst2"), tmp_path, "train")
    message = str(info.value)
    assert "train.tsv" in message and "line 3" in message and "'7'" in message


def test_bad_string_label_in_headerless_file(tmp_path):
    # CoLA has no header: the first data row is line 1.
    _write(tmp_path / "dev.tsv", "gj04\t1\t\tFine.\ngj04\tmaybe\t\tOdd.\n")
    with pytest.raises(DataError, match=r"dev\.tsv.*line 2.*'maybe'"):
        load_split(tasks.get_task("cola"), tmp_path, "validation")


def test_rte_unknown_string_label(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(tmp_path / "dev.tsv", header + "0\tA.\tB.\tentailment\n1\tC.\tD.\tcontradiction\n")
    with pytest.raises(DataError, match=r"line 3.*'contradiction'"):
        load_split(tasks.get_task("rte"), tmp_path, "validation")


@pytest.mark.parametrize("score", ["high", "5.5", "-1", "nan", ""])
def test_bad_stsb_score(tmp_path, score):
    header = "index\tsentence1\tsentence2\tscore\n"
    _write(
        tmp_path / "train.tsv", header + "0\tA.\tB.\t3.2\n1\tC.\tD.\t0\n2\tE.\tF.\t" + score + "\n"
    )
    with pytest.raises(DataError, match=rf"train\.tsv.*line 4.*{score!r}"):
        load_split(tasks.get_task("stsb"), tmp_path, "train")


def test_blank_line_keeps_line_numbers_exact(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\na\t1\n\nb\t0\n")
    with pytest.raises(DataError, match="line 3"):
        load_split(tasks.get_task("sst2"), tmp_path, "train")


def test_missing_columns_are_named(tmp_path):
    _write(tmp_path / "train.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(DataError) as info:
        load_split(tasks.get_task("sst2"), tmp_path, "train")
    message = str(info.value)
    assert "train.tsv" in message and "'sentence'" in message and "['text', 'label']" in message


def test_bom_header_is_stripped(tmp_path):
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(tmp_path / "train.tsv", header + "0\t1\t2\t A b. \tC d.\n")
    examples = load_split(tasks.get_task("mrpc"), tmp_path, "train")
    assert examples.text_a == ["A b."] and examples.text_b == ["C d."]
    assert examples.labels.tolist() == [0]


def test_missing_split_file_lists_present_files(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\n")
    _write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DataError) as info:
        load_split(tasks.get_task("sst2"), tmp_path, "validation")
    message = str(info.value)
    assert str(tmp_path / "dev.tsv") in message
    assert "notes.txt" in message and "train.tsv" in message


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_split(tasks.get_task("sst2"), missing, "train")


def test_split_without_local_file(tmp_path):
    with pytest.raises(DataError, match="has no 'test' split: set data.files.test"):
        load_split(tasks.get_task("sst2"), tmp_path, "test")
    with pytest.raises(DataError, match="unknown split"):
        load_split(tasks.get_task("sst2"), tmp_path, "dev")


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n"])
def test_empty_split(tmp_path, content):
    _write(tmp_path / "train.tsv", content)
    with pytest.raises(DataError, match="empty|no data rows"):
        load_split(tasks.get_task("sst2"), tmp_path, "train")


def test_row_with_extra_field_is_a_parse_error(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\na\t1\nb\t0\textra\n")
    with pytest.raises(DataError, match=r"could not parse .*train\.tsv"):
        load_split(tasks.get_task("sst2"), tmp_path, "train")


def test_data_error_is_a_value_error():
    assert issubclass(text_sources.DataError, ValueError)
