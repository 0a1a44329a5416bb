"""`NerData`: a token-classification (NER) task's splits and batches as the train loop sees
them: sentences of words with one tag each, read from CoNLL files, JSONL / parquet rows or a
hub dataset, tokenized into word pieces of `data.max_length` with the words' tags on their
first piece (or on every piece, `data.label_pieces='all'`)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import jax
import ml_collections
import numpy as np

from finetune_jax.data import chat_batches, ner_tags, selection, text_batches, text_sources
from finetune_jax.data.label_names import choose_label_names
from finetune_jax.data.text_sources import DataError

LABEL_PIECES = ("first", "all")


@dataclasses.dataclass
class NerSplit:
    """One split: the words and gold IOB2 tags of each sentence, and their piece arrays
    (`input_ids`, `attention_mask`, `token_type_ids`, `labels`, `weights`, `word_starts`,
    `word_ids`; [N, max_length])."""

    words: list[list[str]]
    tags: list[list[str]]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.words)


def read_sentences(task: Any, data_dir: str | None, split: str) -> list[tuple[list, list]]:
    """(words, tags) of every sentence of `split`, tags as written (names, or ids for a
    dataset whose tags are ClassLabel ids: then their names)."""
    if task.format == "hub":
        return _hub_sentences(task, split)
    sentences = []
    for path in text_sources.split_files(task, data_dir, split):
        if task.format == "conll":
            sentences += ner_tags.read_conll(path)
        else:
            sentences += _table_sentences(task, path)
    if not sentences:
        raise DataError(f"the {split} split of task {task.name} holds no sentence")
    return sentences


def _table_sentences(task: Any, path: str) -> list[tuple[list, list]]:
    builder = {"jsonl": "json", "parquet": "parquet"}[task.format]
    try:
        table = datasets.load_dataset(builder, data_files={"train": path}, split="train")
    except Exception as e:  # the builders wrap arrow's parse errors; name the file instead
        raise DataError(f"could not read {path!r} as {task.format}: {e.__cause__ or e}") from e
    return _column_sentences(table, task, path, first_row=1)


def _hub_sentences(task: Any, split: str) -> list[tuple[list, list]]:
    if not task.hub_name:
        raise DataError(f"task {task.name} has data.format='hub' but no data.hub_name")
    try:
        table = datasets.load_dataset(task.hub_name, split=split)
    except Exception as e:  # no network, unknown name or split: say which
        raise DataError(f"could not load hub:{task.hub_name}[{split}] (data.hub_name): {e}") from e
    return _column_sentences(table, task, f"hub:{task.hub_name}[{split}]", first_row=0)


def _column_sentences(table, task: Any, source: str, first_row: int) -> list[tuple[list, list]]:
    missing = [c for c in (task.tokens_column, task.tags_column) if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source} lacks columns {missing} (data.tokens_column / data.tags_column); "
            f"found {table.column_names}"
        )
    feature = table.features[task.tags_column]
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) or List(ClassLabel)
    names = inner.names if isinstance(inner, datasets.ClassLabel) else task.label_names
    sentences = []
    for i, (words, tags) in enumerate(zip(table[task.tokens_column], table[task.tags_column])):
        where = f"{source} row {i + first_row}"
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise DataError(f"{where}: expected equal-length lists of words and tags")
        if tags and not isinstance(tags[0], str):
            if names is None:
                raise DataError(f"{where}: tags are ids; set data.label_names to their names")
            tags = [names[int(t)] for t in tags]
        sentences.append(([str(w) for w in words], [str(t) for t in tags]))
    return sentences


def iob2_sentences(task: Any, data_dir: str | None, split: str) -> tuple[list, list]:
    """(words, tags) of `split`, tags checked and converted to IOB2 from `task.tag_scheme`."""
    words, tags = [], []
    for i, (sentence, sentence_tags) in enumerate(read_sentences(task, data_dir, split)):
        ner_tags.check_tags(sentence_tags, f"{split} sentence {i + 1} of task {task.name}")
        words.append(sentence)
        tags.append(ner_tags.to_iob2(sentence_tags, task.tag_scheme))
    return words, tags


def resolve_task(config: ml_collections.ConfigDict, task: Any, saved_names=None) -> Any:
    """`task` with its label names: data.label_names, the run's saved names, or every
    B- / I- tag of the train split ("O" first, see `ner_tags.label_names_from`)."""
    names = choose_label_names(
        task.label_names,
        saved_names,
        lambda: ner_tags.label_names_from(
            iob2_sentences(task, config.data.dir or None, "train")[1]
        ),
    )
    ner_tags.entity_types(names)  # every name is O, B-X or I-X
    if len(names) < 3:
        raise ValueError(f"task {task.name!r} needs at least one entity type; labels {names}")
    return dataclasses.replace(task, label_names=tuple(names))


class NerData:
    """Sentences tokenized into rows of `data.max_length` pieces; batches cut to the smallest
    of `data.buckets` that holds their longest row, training batches seeded and resumable
    (`BucketedRowBatches`), eval batches in order."""

    def __init__(self, config: ml_collections.ConfigDict, task: Any, tokenizer, saved_names=None):
        if config.data.label_pieces not in LABEL_PIECES:
            raise ValueError(
                f"data.label_pieces={config.data.label_pieces!r}: expected one of {LABEL_PIECES}"
            )
        self.config, self.tokenizer = config, tokenizer
        self.task = resolve_task(config, task, saved_names)
        self._ids = {name: i for i, name in enumerate(self.task.label_names)}
        self.buckets = text_batches.bucket_lengths(
            config.data.max_length, tuple(config.data.buckets)
        )
        self._continuation = ner_tags.continuation_ids(self.task.label_names)

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Any) -> dict[str, tuple]:
        """Rows of `data.max_length` pieces (the largest bucket): a label and a weight per piece."""
        shape = (config.train.batch_size, config.data.max_length)
        spec = {k: (shape, np.dtype(np.int32)) for k in ("input_ids", "attention_mask")}
        spec |= {k: (shape, np.dtype(np.int32)) for k in ("token_type_ids", "labels")}
        return spec | {k: (shape, np.dtype(np.float32)) for k in ("weights", "word_starts")}

    def load(self, split: str) -> NerSplit:
        """`split` ("train", "validation", "test" or "holdout") tokenized and labelled."""
        words, tags = iob2_sentences(
            self.task, self.config.data.dir or None, selection.file_split(split)
        )
        rows = selection.config_rows(self.config, split, len(words))
        if rows is not None:
            words, tags = [words[i] for i in rows], [tags[i] for i in rows]
        return self.encode(words, tags, split)

    def encode(self, words: Sequence[list[str]], tags: Sequence[list[str]] | None, split: str):
        """Pieces of `words` (with `tags` labelled; None for prediction)."""
        tag_ids = None
        if tags is not None:
            unknown = sorted({t for row in tags for t in row} - set(self._ids))
            if unknown:
                raise DataError(
                    f"the {split} split of task {self.task.name} has tags {unknown} that the run's "
                    f"labels {self.task.label_names} lack (label_names.json / data.label_names)"
                )
            tag_ids = [[self._ids[t] for t in row] for row in tags]
        encoded = ner_tags.encode_words(
            self.tokenizer,
            words,
            tag_ids,
            self.config.data.max_length,
            self.config.data.label_pieces == "all",
            self._continuation,
        )
        if encoded.words_cut and jax.process_index() == 0:
            total = sum(len(row) for row in words)
            print(
                f"warning: {encoded.words_cut} of {total} {split} words lie beyond "
                f"data.max_length={self.config.data.max_length} pieces: they are not trained, "
                "and not scored (raise data.max_length to keep them)",
                file=sys.stderr,
            )
        arrays = dict(encoded.arrays)
        word_ids = arrays["word_ids"]
        starts = np.zeros(word_ids.shape, np.float32)
        starts[:, 1:] = (word_ids[:, 1:] >= 0) & (word_ids[:, 1:] != word_ids[:, :-1])
        starts[:, 0] = word_ids[:, 0] >= 0
        arrays["word_starts"] = starts
        return NerSplit(list(words), list(tags or []), arrays)

    def raw_split(self, encoded) -> NerSplit:
        """Unlabelled rows of raw texts tokenized by the caller (`input_ids`,
        `attention_mask`, `token_type_ids` padded to `data.max_length`), for prediction:
        weights mark the real pieces, so eval batches tell real rows from filler."""
        mask = np.asarray(encoded["attention_mask"], np.int32)
        arrays = {
            "input_ids": np.asarray(encoded["input_ids"], np.int32),
            "attention_mask": mask,
            "token_type_ids": np.asarray(encoded["token_type_ids"], np.int32),
            "labels": np.zeros(mask.shape, np.int32),
            "weights": mask.astype(np.float32),
            "word_starts": np.zeros(mask.shape, np.float32),
        }
        return NerSplit([[] for _ in mask], [], arrays)

    def train_batches(self) -> BucketedRowBatches:
        """Seeded, resumable batches of training rows for this process, each cut to the
        smallest of `data.buckets` that holds its longest row."""
        return BucketedRowBatches(
            _step_rows(self.load("train").arrays),
            self.buckets,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batches(self, split: NerSplit) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order, cut to buckets; the last batch filled with weight-0 rows."""
        rows = _step_rows(split.arrays)
        lengths = rows["attention_mask"].sum(axis=1)
        batch_size, count = self.config.train.batch_size, len(lengths)
        local = chat_batches.eval_batches(
            rows, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
        )
        for start, batch in zip(range(0, count, batch_size), local):
            # The bucket of the *global* batch, so every process cuts its rows alike.
            length = text_batches.bucket_for(lengths[start : start + batch_size], self.buckets)
            yield {k: v[:, :length] for k, v in batch.items()}

    def eval_batch_count(self, split: NerSplit) -> int:
        """How many batches `eval_batches(split)` yields (for progress): its rows'."""
        return -(-len(split.arrays["input_ids"]) // self.config.train.batch_size)


class BucketedRowBatches(chat_batches.SFTBatches):
    """`SFTBatches` over fixed-width rows, each global batch cut to the smallest bucket that
    holds its longest row (`lengths`, default the `attention_mask` counts; an encoder-decoder
    row's longer side): one compiled step shape per bucket, and no compute on padding beyond
    it. Order, resume and per-process slices are SFTBatches'; with `group` > 0 the order
    puts rows of like length together (`text_batches.LengthGroupedOrder`, groups of `group`
    batches)."""

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        buckets: Sequence[int],
        lengths: np.ndarray | None = None,
        group: int = 0,
        **kwargs,
    ):
        super().__init__(rows, **kwargs)
        self._lengths = rows["attention_mask"].sum(axis=1) if lengths is None else lengths
        self._buckets = tuple(buckets)
        if group:
            self.order = text_batches.LengthGroupedOrder(
                self._lengths, kwargs["batch_size"], kwargs["seed"], group
            )

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.order.next_rows()
        real = rows[rows != text_batches.PADDING_ROW]
        length = text_batches.bucket_for(self._lengths[real], self._buckets)
        batch = chat_batches.take_rows(self._rows, text_batches.local_rows(rows, *self._process))
        return {k: v[:, :length] for k, v in batch.items()}


def _step_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a step batch carries (`word_ids` stays on the host)."""
    return {k: v for k, v in arrays.items() if k != "word_ids"}
