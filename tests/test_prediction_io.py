"""Rows in and out of predict: every input kind streamed in chunks, outputs written whole or
not at all, and the output columns of each head kind."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest

from finetune_jax.data import prediction_io
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
