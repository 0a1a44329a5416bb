"""Speech rows (audio + transcript) from local JSONL / CSV files or an HF `datasets` split,
decoded with soundfile and resampled to the model's rate.

  load_rows    a split -> [AudioRow(source, text)], where `source` is a file path or encoded
               audio bytes (an HF Audio column read with decode=False)
  read_audio   an AudioRow's source -> mono float32 samples at `rate` Hz
  resample     float32 samples from one rate to another (soxr, "HQ" quality)

Audio columns are read undecoded (`Audio(decode=False)`) so that one decoder (soundfile)
serves files and datasets alike, and `datasets` needs no audio backend of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib

import numpy as np

from finetune_jax.data.text_sources import DataError


@dataclasses.dataclass(frozen=True)
class AudioRow:
    """One example: where its audio is (a path, or the encoded file's bytes) and its text."""

    source: str | bytes
    text: str

    def describe(self) -> str:
        """The row's audio in messages: its path, or the size of its bytes."""
        return self.source if isinstance(self.source, str) else f"<{len(self.source)} bytes>"


def load_rows(
    data_dir: str,
    split: str,
    *,
    hub_dataset: str = "",
    audio_column: str = "audio",
    text_column: str = "text",
) -> list[AudioRow]:
    """The rows of `split`: from `hub_dataset` (any `datasets.load_dataset` name or local
    dataset directory) when set, else `{data_dir}/{split}.jsonl` or `.csv`, whose `audio`
    paths are relative to the file's directory."""
    if hub_dataset:
        return _dataset_rows(hub_dataset, split, audio_column, text_column)
    if not data_dir:
        raise DataError("a speech task needs data.dir (JSONL/CSV files) or data.hub_name")
    root = pathlib.Path(data_dir)
    for suffix in (".jsonl", ".csv"):
        path = root / f"{split}{suffix}"
        if path.is_file():
            records = _jsonl(path) if suffix == ".jsonl" else _csv(path)
            return [_row(record, path, line, audio_column, text_column) for line, record in records]
    raise DataError(f"{str(root)!r} has no {split}.jsonl or {split}.csv for split {split!r}")


def _jsonl(path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    yield line, json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{str(path)!r} line {line}: invalid JSON ({e.msg})") from e


def _csv(path: pathlib.Path):
    with open(path, encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), 2)  # line 1 is the header


def _row(record, path: pathlib.Path, line: int, audio_column: str, text_column: str) -> AudioRow:
    missing = [c for c in (audio_column, text_column) if c not in record]
    if missing:
        raise DataError(
            f"{str(path)!r} line {line}: missing column(s) {missing}; found {sorted(record)}"
        )
    audio = pathlib.Path(record[audio_column])
    audio = audio if audio.is_absolute() else path.parent / audio
    return AudioRow(str(audio), str(record[text_column]))


def _dataset_rows(name: str, split: str, audio_column: str, text_column: str) -> list[AudioRow]:
    import datasets  # imported only for this source: it is slow to import

    dataset = datasets.load_dataset(name, split=split)
    for column in (audio_column, text_column):
        if column not in dataset.column_names:
            raise DataError(
                f"dataset {name!r} split {split!r} has no column {column!r}; columns: "
                f"{dataset.column_names} (set data.audio_column / data.transcript_column)"
            )
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    rows = []
    for index, record in enumerate(dataset):
        audio = record[audio_column]
        source = audio.get("bytes") or audio.get("path")
        if not source:
            raise DataError(f"dataset {name!r} split {split!r} row {index}: audio has no data")
        rows.append(AudioRow(source, str(record[text_column])))
    return rows


def read_audio(source: str | bytes, rate: int) -> np.ndarray:
    """Mono float32 samples of a file path or encoded bytes, resampled to `rate` Hz."""
    import soundfile

    where = source if isinstance(source, str) else io.BytesIO(source)
    if isinstance(source, str) and not os.path.isfile(source):
        raise DataError(f"audio file {source!r} does not exist")
    try:
        samples, source_rate = soundfile.read(where, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        name = source if isinstance(source, str) else f"<{len(source)} bytes>"
        raise DataError(f"cannot decode audio {name}: {e}") from e
    # Channels averaged, as the feature extractors of speech models expect mono.
    return resample(samples.mean(axis=1), source_rate, rate)


def resample(samples: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """float32 samples from `source_rate` to `rate` Hz with soxr's band-limited resampler
    (a plain interpolation would alias high frequencies into the speech band)."""
    samples = np.asarray(samples, np.float32)
    if source_rate == rate:
        return samples
    import soxr

    return np.asarray(soxr.resample(samples, source_rate, rate, quality="HQ"), np.float32)
