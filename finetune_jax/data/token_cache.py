"""Tokenized text splits cached on disk: built chunk by chunk once, read row by row after.

A split's cache lives in `<root>/text_tokens/<key>/`, root being `data.cache_dir` or the
project's cache root (`$FINETUNE_JAX_CACHE`, else `~/.cache/finetune_jax`). The key hashes
everything the tokens depend on: the content digest of every source file, the tokenizer's
class and full definition (vocab, normalizer, special tokens), `max_length` and the task
(columns, label mapping). So a run, its restart, `eval` and `predict` share one cache, and
changing any of those builds a new one.

Storage is flat binary arrays:
  input_ids.bin       int32, every row's tokens back to back
  token_type_ids.bin  int8, aligned with input_ids
  offsets.bin         int64 [rows + 1]: row i is tokens[offsets[i]:offsets[i + 1]]
  labels.bin          int32 class ids, float32 scores [rows] or multi-hot [rows, classes]
  meta.json           row and token counts, label dtype, what the key was made of
Why not Arrow: the batcher wants a few rows of a ragged int array at random, which one
positional read (`os.pread`) per row gives with no decoding and no dependency. Offsets and
labels are read whole (12 bytes a row); the token files are never loaded or mapped, so a
process holds only the rows of its own batch slices (the OS page cache, shared between the
processes of a host, keeps what is hot). Not `np.memmap`: every page fault on a mapping also
maps its cached neighbours (fault-around, ~64 KiB), which made a 1M-row run's resident set
grow by ~100 MB in 20 batches of random rows.
Building appends each tokenized chunk to these files, so peak memory is one chunk, not the
split. A build writes a temporary sibling directory and renames it into place, under a file
lock: concurrent processes on a host wait for one builder; hosts sharing a file system that
cannot lock build identical copies and the first rename wins.

Source files are fingerprinted by a content digest (blake2b), memoised in a stamp keyed by
(path, size, mtime), so an unchanged file is not hashed again and a touched-but-equal file
still hits the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np

from finetune_jax.cache_paths import cache_root
from finetune_jax.data import text_batches, text_sources
from finetune_jax.data.text_tasks import Task

CHUNK_ROWS = 10_000  # rows read and tokenized at a time while building
# Bump when the layout, the tokenization call or the rows read change. 2: csv / tsv read by
# `row_files` (version 1's reader let an empty text or a first row's unquoted comma through:
# its caches of such files would hide the error the reader now gives).
FORMAT_VERSION = 2


def tokens_root(cache_dir: str = "") -> pathlib.Path:
    """`<data.cache_dir or the project cache root>/text_tokens`."""
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()
    return root / "text_tokens"


def file_digest(path: str, root: pathlib.Path) -> str:
    """Content digest of `path`, reusing the stamp of an earlier hash of the same
    (path, size, mtime)."""
    stat = os.stat(path)
    absolute = os.path.abspath(path)
    name = hashlib.blake2b(absolute.encode(), digest_size=16).hexdigest()
    stamp_path = root / "stamps" / f"{name}.json"
    seen = {"path": absolute, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in seen} == seen:
            return stamp["digest"]
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    _write_json_atomic(stamp_path, {**seen, "digest": digest.hexdigest()})
    return digest.hexdigest()


def split_fingerprint(
    task: Task, data_dir: str | None, split: str, root: pathlib.Path
) -> dict[str, str]:
    """{source file: content digest} of `split`; a hub split is named by its hub id."""
    files = text_sources.split_files(task, data_dir, split)
    if not files:
        return {"hub:" + "/".join(task.hub_name) + f"[{split}]": "hub"}
    return {path: file_digest(path, root) for path in files}


def tokenizer_identity(tokenizer) -> str:
    """Class and digest of the tokenizer's full definition (vocab, normalizer, special
    tokens): the same tokenizer saved in two directories has one identity."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are set per call (tokenize sets them): not the identity.
        definition = json.loads(backend.to_str())
        definition = json.dumps({**definition, "truncation": None, "padding": None})
    else:  # a slow tokenizer: its vocab and settings
        definition = json.dumps(
            [sorted(tokenizer.get_vocab().items()), repr(tokenizer.init_kwargs)], default=str
        )
    digest = hashlib.blake2b(definition.encode(), digest_size=16).hexdigest()
    return f"{type(tokenizer).__name__}:{digest}"


def open_split(
    task: Task,
    data_dir: str | None,
    split: str,
    tokenizer,
    max_length: int,
    cache_dir: str = "",
) -> NerSplit:
    """The tokenized `split` (a file split: train, validation, test), built on first use."""
    root = tokens_root(cache_dir)
    fingerprint = split_fingerprint(task, data_dir, split, root)
    recipe = {
        "format": FORMAT_VERSION,
        "sources": sorted(fingerprint.values()),
        "tokenizer": tokenizer_identity(tokenizer),
        "max_length": max_length,
        "task": repr(task),  # columns, label names / raw labels, ranges: all of it
        "split": split,
    }
    key = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=16)
    target = root / key.hexdigest()
    if not (target / "meta.json").is_file():
        with _locked(root / f"{target.name}.lock"):
            if not (target / "meta.json").is_file():  # another process may have built it
                # A long build should not look like a hang; one builder per host says so.
                print(
                    f"tokenizing {split} of {', '.join(fingerprint)} into {target}", file=sys.stderr
                )
                started = time.perf_counter()
                chunks = text_sources.iter_split_chunks(task, data_dir, split, CHUNK_ROWS)
                _build(chunks, tokenizer, max_length, target, {**recipe, "files": fingerprint})
                seconds = time.perf_counter() - started
                print(f"tokenized {split} in {seconds:.1f} s (reused from now on)", file=sys.stderr)
    return NerSplit(target, fingerprint)


def _build(
    chunks: Iterator[text_sources.Examples],
    tokenizer,
    max_length: int,
    target: pathlib.Path,
    meta: dict,
) -> None:
    """Tokenizes `chunks` into a temporary directory and renames it to `target`."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    temporary.mkdir(parents=True)
    try:
        rows = tokens = 0
        label_dtype, label_shape = None, []
        with contextlib.ExitStack() as stack:
            out = {
                name: stack.enter_context(open(temporary / f"{name}.bin", "wb"))
                for name in ("input_ids", "token_type_ids", "offsets", "labels")
            }
            out["offsets"].write(np.zeros(1, np.int64).tobytes())
            for chunk in chunks:
                encoded = text_batches.tokenize(chunk, tokenizer, max_length)
                types = np.concatenate(encoded.token_type_ids)
                if types.size and not 0 <= types.min() <= types.max() <= 127:
                    raise ValueError(f"token_type_ids outside 0..127 in {chunk.source!r}")
                ends = tokens + np.cumsum(encoded.lengths, dtype=np.int64)
                out["input_ids"].write(np.concatenate(encoded.input_ids).tobytes())
                out["token_type_ids"].write(types.astype(np.int8).tobytes())
                out["offsets"].write(ends.tobytes())
                out["labels"].write(encoded.labels.tobytes())
                label_dtype = encoded.labels.dtype.name
                label_shape = list(encoded.labels.shape[1:])  # [classes] for multi-hot rows
                rows, tokens = rows + len(encoded), int(ends[-1])
        meta |= {
            "rows": rows,
            "tokens": tokens,
            "label_dtype": label_dtype,
            "label_shape": label_shape,
        }
        _write_json_atomic(temporary / "meta.json", meta)
        try:
            os.rename(temporary, target)
        except OSError:  # a process on another host renamed its identical copy first
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


class NerSplit:
    """A cached tokenized split, read row by row, optionally restricted to `rows` (a view).

    Quacks like `text_batches.Encoded` (input_ids[i], token_type_ids[i], labels, lengths,
    len), so `collate`, `eval_batches` and the train iterators read it row by row.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        fingerprint: dict[str, str],
        rows: np.ndarray | None = None,
    ):
        self.directory, self.fingerprint = directory, fingerprint
        meta = json.loads((directory / "meta.json").read_text())
        self.source = ", ".join(fingerprint)
        self._offsets = np.fromfile(directory / "offsets.bin", np.int64)
        labels = np.fromfile(directory / "labels.bin", np.dtype(meta["label_dtype"]))
        labels = labels.reshape(-1, *meta.get("label_shape", []))
        self._rows = rows
        self.labels = labels if rows is None else labels[rows]
        self.input_ids = _Ragged(directory / "input_ids.bin", np.int32, self._offsets, rows)
        self.token_type_ids = _Ragged(
            directory / "token_type_ids.bin", np.int8, self._offsets, rows
        )
        self.num_file_rows = int(meta["rows"])

    def __len__(self) -> int:
        return self.num_file_rows if self._rows is None else len(self._rows)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Token count of every row, int32 [len(self)]."""
        lengths = np.diff(self._offsets).astype(np.int32)
        return lengths if self._rows is None else lengths[self._rows]

    def take(self, rows: np.ndarray) -> NerSplit:
        """A view of the rows at `rows` (indices into this view), in that order."""
        rows = np.asarray(rows, np.int64)
        file_rows = rows if self._rows is None else self._rows[rows]
        return NerSplit(self.directory, self.fingerprint, file_rows)


class _Ragged:
    """Row i of a flat token file split at `offsets` (through an optional row view), read
    with one positional read: no file position is shared, so threads may read at once."""

    def __init__(self, path: pathlib.Path, dtype, offsets: np.ndarray, rows: np.ndarray | None):
        self._file = open(path, "rb")  # closed when this object is collected
        self._dtype, self._offsets, self._rows = np.dtype(dtype), offsets, rows

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._rows is None else len(self._rows)

    def __getitem__(self, index: int) -> np.ndarray:
        row = index if self._rows is None else self._rows[index]
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        size = self._dtype.itemsize
        data = os.pread(self._file.fileno(), (end - start) * size, start * size)
        return np.frombuffer(data, self._dtype)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock on `path` across the processes of this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: pathlib.Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)
