"""The translation kind without a model: pairs read alike from every file format and from HF
datasets, errors naming the row; rows tokenized and shifted for teacher forcing; eval batches
shortest first with their row ids; chrF / BLEU equal to sacrebleu's own; format specifiers
counted as a person counts them; data keys the kind does not read refused."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import sacrebleu

from finetune_jax import tasks
from finetune_jax.config import base_config
from finetune_jax.data import translation_sources
from finetune_jax.data.text_sources import DataError
from finetune_jax.data.translation_loader import TranslationData
from finetune_jax.evaluation import translation_scores
from finetune_jax.tasks.kind import check_data_keys
from tests.helpers import SHARED_DATA

PAIRS = [
    ("%s failed: exit code %d", "%s falhou: código de saída %d"),
    ("Authentication failure", "Falha de autenticação"),
    ("Cannot open %(file)s\n", "Não foi possível abrir %(file)s\n"),
    ("Access granted", "Acesso concedido"),
    ("{0} files", "{0} arquivos"),
]
EOS, UNK, PAD, START = 0, 1, 2, 3


def _config(data_dir="", **data):
    config = base_config()
    config.data.task = "translation"
    config.data.dir = str(data_dir)
    config.data.max_length = 16
    config.data.buckets = (4, 8)
    config.train.batch_size = 2
    for key, value in data.items():
        config.data[key] = value
    return config


def _write(tmp_path, pairs, name, fmt):
    rows = [{"en": s, "pt_BR": t, "package": "x"} for s, t in pairs]
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).to_csv(str(path), sep="\t" if fmt == "tsv" else ",")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_every_file_format_reads_the_same_pairs(tmp_path, fmt):
    _write(tmp_path, PAIRS, "train", fmt)
    config = _config(tmp_path, files={"train": f"train.{fmt}", "validation": "", "test": ""})
    task = tasks.task_for(config.data)
    assert task.format == fmt  # from the extension
    pairs = translation_sources.read_pairs(task, str(tmp_path), "train")
    assert list(zip(pairs.sources, pairs.targets)) == PAIRS
    assert pairs.where[1].endswith(("line 2", "line 3", "row 2"))


def test_hub_datasets_saved_to_disk_or_as_files(tmp_path):
    rows = {"en": [s for s, _ in PAIRS], "pt_BR": [t for _, t in PAIRS]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    (tmp_path / "files").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "files" / "train.parquet"))
    for name in ("files", "saved"):
        task = tasks.task_for(_config(hub_name=str(tmp_path / name)).data)
        assert task.format == "hub"
        pairs = translation_sources.read_pairs(task, None, "train")
        assert list(zip(pairs.sources, pairs.targets)) == PAIRS
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'validation'"):
        translation_sources.read_pairs(task, None, "validation")


def test_a_missing_column_or_empty_cell_names_file_and_line(tmp_path):
    path = _write(tmp_path, [*PAIRS[:2], ("Ok", "  ")], "train", "jsonl")
    config = _config(tmp_path, files={"train": "train.jsonl", "validation": "", "test": ""})
    task = tasks.task_for(config.data)
    with pytest.raises(DataError, match=rf"'{path}' line 3: column 'pt_BR' is empty"):
        translation_sources.read_pairs(task, str(tmp_path), "train")
    config.data.target_column = "pt"
    with pytest.raises(
        DataError, match=r"line 1: no column\(s\) \['pt'\] .*found \['en', 'package', 'pt_BR'\]"
    ):
        translation_sources.read_pairs(tasks.task_for(config.data), str(tmp_path), "train")


def test_data_keys_translation_does_not_read_are_refused():
    config = _config(label_column="label")
    kind = tasks.kind_of(tasks.task_for(config.data))
    with pytest.raises(ValueError, match=r"data.label_column='label' is not read by translation"):
        check_data_keys(config, kind, base_config().data)
    config = base_config()  # and a text classification task does not read translation's keys
    config.data.source_column = "de"
    with pytest.raises(ValueError, match=r"data.source_column='de' is not read by text_class"):
        check_data_keys(config, tasks.KINDS["text_classification"], base_config().data)


class _WordTokenizer:
    """Words -> ids (a new id per new word), EOS-terminated sources as Marian's tokenizer
    makes them; targets without EOS, so the loader appends it."""

    pad_token_id = PAD

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _ids(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def __call__(self, texts=None, text_target=None, truncation=False, max_length=None):
        if text_target is not None:
            return {"input_ids": [self._ids(t) for t in text_target]}
        rows = [[*self._ids(t), EOS] for t in texts]
        if truncation:
            rows = [r if len(r) <= max_length else [*r[: max_length - 1], EOS] for r in rows]
        return {"input_ids": rows}


@pytest.fixture
def generation_dir(tmp_path):
    """A model directory's generation settings: config.json only (no generation_config.json)."""
    config = {"decoder_start_token_id": START, "eos_token_id": EOS, "pad_token_id": PAD}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_rows_are_teacher_forced_behind_the_start_token(tmp_path, generation_dir):
    _write(tmp_path, PAIRS, "train", "jsonl")
    config = _config(tmp_path, files={"train": "train.jsonl", "validation": "", "test": ""})
    tokenizer = _WordTokenizer()
    data = TranslationData(config, tasks.task_for(config.data), tokenizer, str(generation_dir))
    split = data.load("train")
    source, target = tokenizer._ids(PAIRS[0][0]), tokenizer._ids(PAIRS[0][1])
    row = {k: v[0] for k, v in split.rows.items()}
    assert row["input_ids"].tolist() == [*source, EOS] + [PAD] * (16 - len(source) - 1)
    assert row["attention_mask"].sum() == len(source) + 1
    steps = len(target) + 1  # the target and its EOS
    assert row["decoder_input_ids"][:steps].tolist() == [START, *target]
    assert row["labels"][:steps].tolist() == [*target, EOS]
    assert row["weights"].tolist() == [1.0] * steps + [0.0] * (16 - steps)
    assert row["decoder_attention_mask"].sum() == steps
    assert split.lengths[0] == max(len(source) + 1, steps)


def test_eval_batches_go_shortest_first_with_their_row_ids(tmp_path, generation_dir):
    _write(tmp_path, PAIRS, "validation", "jsonl")
    config = _config(tmp_path, files={"train": "", "validation": "validation.jsonl", "test": ""})
    data = TranslationData(
        config, tasks.task_for(config.data), _WordTokenizer(), str(generation_dir)
    )
    split = data.load("validation")
    batches = list(data.eval_batches(split))
    assert data.evaluated is split  # the scorer reads its texts
    assert len(batches) == data.eval_batch_count(split) == 3
    ids = [i for b in batches for i, w in zip(b["row_ids"], b["weights"]) if w.any()]
    assert sorted(ids) == list(range(5))  # every row once
    assert all(np.diff(split.lengths[ids]) >= 0)  # shortest first
    for batch in batches:
        real = batch["weights"].any(axis=1)
        assert batch["input_ids"].shape[1] == (
            4 if split.lengths[batch["row_ids"][real]].max() <= 4 else 8
        )
        np.testing.assert_array_equal(
            batch["input_ids"][real],
            split.rows["input_ids"][batch["row_ids"][real], : batch["input_ids"].shape[1]],
        )
    last = batches[-1]
    assert last["weights"][1].sum() == 0 and last["attention_mask"][1].tolist()[0] == 1


def test_the_l10n_preset_reads_the_shared_files():
    if not (SHARED_DATA / "l10n_en_pt_br").is_dir():
        pytest.skip("shared data not present")
    config = base_config()
    config.data.task, config.data.dir = "l10n_en_pt_br", str(SHARED_DATA / "l10n_en_pt_br")
    task = tasks.task_for(config.data)
    pairs = translation_sources.read_pairs(task, config.data.dir, "validation")
    assert len(pairs) == 1631 and pairs.sources[0] and pairs.targets[0]


def test_chrf_and_bleu_are_sacrebleus_own():
    hypotheses = ["  O gato está no tapete\n", "Falha de autenticação", "%s falhou"]
    references = ["O gato estava no tapete", "Falha na autenticação ", "%s falhou: código %d"]
    scores = translation_scores.corpus_scores(hypotheses, references, references)
    stripped = [h.strip() for h in hypotheses], [[r.strip() for r in references]]
    assert scores["chrf"] == sacrebleu.corpus_chrf(*stripped).score
    assert scores["bleu"] == sacrebleu.corpus_bleu(*stripped).score
    signatures = translation_scores.signatures()
    assert signatures["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    assert "tok:13a" in signatures["bleu_signature"]


def test_format_specifiers_are_counted_as_a_person_counts_them():
    count = translation_scores.format_specifiers
    assert count("%s of %d files (%.1f%%)\n") == {"%s": 1, "%d": 1, "%.1f": 1, "%%": 1}
    assert count("%1$s: %-5.2f, %lu, %.*s, %zu, %'d") == {
        "%1$s": 1,
        "%-5.2f": 1,
        "%lu": 1,
        "%.*s": 1,
        "%zu": 1,
        "%'d": 1,
    }
    assert count("Hello %(name)s, {0} and {user} %<PRIu64>") == {
        "%(name)s": 1,
        "{0}": 1,
        "{user}": 1,
        "%<PRIu64>": 1,
    }
    assert count("  line one\nline two\n\n") == {"\n": 1}  # edges stripped, inner kept
    assert count("100% sure, 50 % done { not a field }") == {}
    assert count("a\nb %s", newlines=False) == {"%s": 1}


def test_preserved_rate_counts_rows_whose_source_has_specifiers():
    sources = ["%s failed %d", "no specifier", "%s\nmore", "{0} files"]
    outputs = ["%d falhou %s", "nenhum %s", "%s mais", "{1} arquivos"]
    # Rows 1, 3, 4 have specifiers; row 1 keeps them (reordered), 3 loses the newline, 4 {0}.
    assert translation_scores.preserved_rate(sources, outputs) == pytest.approx(1 / 3)
    assert translation_scores.preserved_rate(sources, outputs, newlines=False) == pytest.approx(
        2 / 3
    )
    assert translation_scores.preserved_rate(["plain"], ["simples"]) == 1.0
