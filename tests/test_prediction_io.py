"""Rows in and out of predict: every input kind streamed in chunks, outputs written whole or
not at all, and the output columns of each head kind."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest

from finetune_jax import tasks
from finetune_jax.config import base_config
from finetune_jax.data import prediction_io
from finetune_jax.data.text_sources import DataError, load_split
from finetune_jax.evaluation.prediction import label_columns, prompt_messages


def _rows(tmp_path, name, frame):
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, sep="\t" if name.endswith(".tsv") else ",", index=False)
    return str(path)


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv", "rows.jsonl", "rows.parquet"])
def test_every_table_kind_streams_in_chunks_in_file_order(tmp_path, name):
    frame = pd.DataFrame({"sentence": [f"text, {i}" for i in range(7)], "id": range(7)})
    chunks = list(prediction_io.read_chunks(_rows(tmp_path, name, frame), rows=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    rows = [r for c in chunks for r in c]
    assert [r["sentence"] for r in rows] == list(frame["sentence"])
    assert [int(r["id"]) for r in rows] == list(range(7))


def test_image_lists_resolve_paths_beside_the_list_file(tmp_path):
    (tmp_path / "list.txt").write_text("a.png\n\n/abs/b.png\n")
    rows = [r for c in prediction_io.read_chunks(str(tmp_path / "list.txt"), 8) for r in c]
    assert rows == [{"path": str(tmp_path / "a.png")}, {"path": "/abs/b.png"}]
    (tmp_path / "rows.xlsx").write_text("")
    with pytest.raises(ValueError, match="unknown file kind '.xlsx'"):
        prediction_io.check_input(str(tmp_path / "rows.xlsx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prediction_io.check_input(str(tmp_path / "missing.csv"))


def test_writer_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    with prediction_io.RowWriter(str(out)) as writer:
        writer.write([{"a": 1, "p": np.float32(0.5)}])
    assert json.loads(out.read_text()) == {"a": 1, "p": 0.5}
    with pytest.raises(FileExistsError, match="--overwrite"):
        prediction_io.RowWriter(str(out))
    with pytest.raises(RuntimeError):
        with prediction_io.RowWriter(str(out), overwrite=True) as writer:
            writer.write([{"a": 2}])
            raise RuntimeError("model failed mid-way")
    assert json.loads(out.read_text())["a"] == 1 and [p.name for p in tmp_path.iterdir()] == [
        "out.jsonl"
    ]
    with prediction_io.RowWriter(str(tmp_path / "out.csv")) as writer:
        writer.write([{"text": "x", "label": ["a", "b"]}])
    assert (tmp_path / "out.csv").read_text().splitlines() == ["text,label", "x,a|b"]
    # A diverged model's NaN probabilities (scalar or in a list) are null: valid JSON lines.
    with prediction_io.RowWriter(str(tmp_path / "nan.jsonl")) as writer:
        writer.write([{"p": np.float32("nan"), "probs": np.array([np.nan, 1.0])}])
    text = (tmp_path / "nan.jsonl").read_text()
    assert json.loads(text) == {"p": None, "probs": [None, 1.0]} and "NaN" not in text
    assert prediction_io.merge({"label": "gold"}, {"label": "a"}) == {
        "label": "gold",
        "predicted_label": "a",
    }


def _task(**kw):
    return types.SimpleNamespace(**({"is_regression": False, "is_multi_label": False} | kw))


def test_label_columns_of_each_head_kind():
    logits = np.asarray([[2.0, 0.0, -2.0], [0.0, 3.0, 1.0]])
    single = label_columns(_task(), ["a", "b", "c"], logits)
    assert [r["label"] for r in single] == ["a", "b"]
    assert np.allclose([sum(v for k, v in r.items() if k.startswith("prob_")) for r in single], 1)
    multi = label_columns(_task(is_multi_label=True), ["a", "b", "c"], logits, threshold=0.7)
    assert [r["label"] for r in multi] == [["a"], ["b", "c"]]
    assert np.isclose(multi[0]["prob_a"], 1 / (1 + np.exp(-2.0)))
    regression = label_columns(_task(is_regression=True), None, np.asarray([[1.5], [3.0]]))
    assert regression == [{"score": 1.5}, {"score": 3.0}]


def test_prompt_rows_are_chat_messages():
    assert prompt_messages({"prompt": "hi"}, "f") == [{"role": "user", "content": "hi"}]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert prompt_messages({"messages": messages}, "f") == messages
    with pytest.raises(ValueError, match="needs a `prompt` string"):
        prompt_messages({"text": "hi"}, "prompts.jsonl")


def test_a_disabled_writer_counts_rows_and_writes_nothing(tmp_path):
    with prediction_io.RowWriter(str(tmp_path / "out.csv"), enabled=False) as writer:
        writer.write([{"a": 1}, {"a": 2}])
    assert writer.rows == 2 and not any(tmp_path.iterdir())


def test_a_row_train_rejects_is_rejected_by_predict_with_the_same_message(tmp_path):
    # Train reads a csv through the same reader: one message, line included, for both.
    path = tmp_path / "new.csv"
    path.write_text("text,label\ngood,pos\nI did not expect to like it, but I loved it,pos\n")
    config = base_config()
    config.data.task, config.data.files.train = "text_classification", str(path)
    config.data.label_names = ("neg", "pos")
    with pytest.raises(DataError) as train_error:
        load_split(tasks.task_for(config.data), None, "train")
    with pytest.raises(DataError) as predict_error:
        list(prediction_io.read_chunks(str(path), 8))
    assert str(predict_error.value) == str(train_error.value)
    assert "new.csv' line 3 as csv: 3 fields, but the header has 2" in str(predict_error.value)


def test_an_empty_text_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text('sentence,id\nfine,1\n"  ",2\n')
    (chunk,) = prediction_io.read_chunks(str(path), 8)
    with pytest.raises(DataError, match=r"new\.csv' line 3: column 'sentence' is empty"):
        prediction_io.text_examples(chunk, ["sentence"], str(path))


@pytest.mark.parametrize("name", ["rows.csv", "rows.jsonl"])
def test_a_byte_that_is_not_utf8_names_its_line(tmp_path, name):
    path = tmp_path / name
    row = b"caf\xe9,1\n" if name.endswith(".csv") else b'{"sentence": "caf\xe9"}\n'
    path.write_bytes((b"sentence,id\nfine,1\n" if name.endswith(".csv") else b"") + row)
    line = 3 if name.endswith(".csv") else 1
    with pytest.raises(DataError, match=rf"{name}' line {line}, byte \d+: b'\\xe9' is not UTF-8"):
        list(prediction_io.read_chunks(str(path), 8))


def test_an_output_directory_that_refuses_writes_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", args[0])

    monkeypatch.setattr(prediction_io, "open", read_only, raising=False)
    with pytest.raises(OSError, match="cannot write in") as error:
        with prediction_io.RowWriter(str(tmp_path / "out.csv")):
            pass
    assert error.value.strerror == f"--output={str(tmp_path / 'out.csv')!r}: cannot write in " + (
        f"{str(tmp_path)!r} (Read-only file system)"
    )


def test_a_glue_tsv_is_read_without_quoting_for_a_glue_run_as_train_reads_it(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text('sentence\tlabel\n"odd start\t1\nfine\t0\n')
    rows = [r for c in prediction_io.read_chunks(str(path), 8, tasks.get_task("sst2")) for r in c]
    assert [r["sentence"] for r in rows] == ['"odd start', "fine"]
    with pytest.raises(DataError, match=r"dev\.tsv' line 2 as tsv: .*quote opened there"):
        list(prediction_io.read_chunks(str(path), 8))  # a run of your own files: quoting
