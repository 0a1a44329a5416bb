"""Log-mel features of a split's clips, computed once by the model's own feature extractor
and kept on disk, so training reads ready arrays and never touches audio in the step loop.

  load_extractor   the model directory's preprocessor_config.json -> WhisperFeatureExtractor
  window_frames    `data.audio_seconds` -> (samples, frames) of the input window
  split_features   rows -> Features (cached, keyed by the audio's content and the settings;
                   a first computation shows its progress: minutes for thousands of clips)
  Features.take    clip indices -> [B, mel, frames] float32, exactly the extractor's output

Storage: a clip shorter than the window has a tail of identical frames (silence clamped to
the clip's max - 8 dB, then normalised); only the frames before that tail and one tail frame
are kept (~10x less for 3 s clips in a 30 s window), and `take` rebuilds the exact array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from finetune_jax import progress
from finetune_jax.cache_paths import cache_root
from finetune_jax.data.audio_sources import AudioRow, read_audio
from finetune_jax.data.text_sources import DataError

FORMAT_VERSION = 1  # bump when the stored layout or the computation changes


def load_extractor(model_dir: str | os.PathLike):
    """transformers' WhisperFeatureExtractor from `model_dir`'s preprocessor_config.json."""
    from transformers import WhisperFeatureExtractor

    if not (pathlib.Path(model_dir) / "preprocessor_config.json").is_file():
        raise DataError(
            f"model directory {str(model_dir)!r} has no preprocessor_config.json, which says "
            "how audio becomes features; a speech task needs a speech model's directory"
        )
    return WhisperFeatureExtractor.from_pretrained(str(model_dir))


def window_frames(extractor, seconds: float) -> tuple[int, int]:
    """(samples, feature frames) of a `seconds` window: the extractor's own window for
    seconds <= 0 or beyond it; frames rounded down to an even count, as the encoder's
    stride-2 convolution halves them."""
    full = int(extractor.n_samples)
    samples = full if seconds <= 0 else min(full, int(round(seconds * extractor.sampling_rate)))
    frames = (samples // extractor.hop_length) // 2 * 2
    if frames < 2:
        raise DataError(f"data.audio_seconds={seconds} gives a window of {frames} frames")
    return frames * extractor.hop_length, frames


@dataclasses.dataclass
class Features:
    """A split's features in compact form (see the module docstring).

    heads: per clip, [mel, k] float32 frames before its constant tail;
    tails: [N, mel] float32, the tail frame repeated to the window's end.
    """

    heads: list[np.ndarray]
    tails: np.ndarray
    frames: int

    def __len__(self) -> int:
        return len(self.heads)

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """[len(indices), mel, frames] float32; index -1 gives an all-zero (filler) row."""
        out = np.zeros((len(indices), self.tails.shape[1], self.frames), np.float32)
        for row, index in enumerate(indices):
            if index < 0:
                continue
            head = self.heads[index]
            out[row, :, : head.shape[1]] = head
            out[row, :, head.shape[1] :] = self.tails[index][:, None]
        return out


def compress(features_MF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([mel, k] frames before the trailing run of frames equal to the last, the last frame)."""
    last = features_MF[:, -1]
    same = np.all(features_MF == last[:, None], axis=0)
    k = len(same) - int(np.argmin(same[::-1])) if not same.all() else 0
    return np.ascontiguousarray(features_MF[:, :k]), last.copy()


def split_features(
    rows: Sequence[AudioRow], extractor, seconds: float, cache_dir: str = "", label: str = ""
) -> Features:
    """Features of every row, from the cache when the same audio was featurised before with
    the same extractor settings and window; else computed (and stored) here, with progress
    shown under `label` (the split's name)."""
    samples, frames = window_frames(extractor, seconds)
    settings = {**extractor.to_dict(), "window_samples": samples, "version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for row in rows:
        key.update(_fingerprint(row.source).encode())
    path = _cache_dir(cache_dir) / f"{key.hexdigest()[:32]}.npz"
    if path.is_file():
        return _read(path, frames)
    label = f"audio features of {label or 'the split'}"
    if progress.shown():  # a long first computation should not look like a hang
        print(f"computing {label} ({len(rows):,} clips) into {path}", file=sys.stderr)
    started = time.perf_counter()
    heads, tails = [], []
    for row in progress.track(rows, len(rows), label, "clip"):
        audio = read_audio(row.source, extractor.sampling_rate)
        if audio.size == 0:
            raise DataError(f"audio {row.describe()} holds no samples")
        features = extractor(
            audio, sampling_rate=extractor.sampling_rate, max_length=samples, return_tensors="np"
        ).input_features[0]
        head, tail = compress(features.astype(np.float32))
        heads.append(head)
        tails.append(tail)
    result = Features(heads, np.stack(tails), frames)
    _write(path, result)
    if progress.shown():
        seconds = time.perf_counter() - started
        print(f"computed {label} in {seconds:.1f} s (reused from now on)", file=sys.stderr)
    return result


def _fingerprint(source: str | bytes) -> str:
    """The audio's content hash: a moved or copied file keeps its features, an edited one
    (same name) does not."""
    data = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _cache_dir(cache_dir: str) -> pathlib.Path:
    """`<data.cache_dir or the project cache root>/audio_features`, beside text_tokens."""
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()
    return root / "audio_features"


def _write(path: pathlib.Path, features: Features) -> None:
    """One .npz per split, written to a temporary sibling and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.asarray([h.shape[1] for h in features.heads], np.int64)
    mel = features.tails.shape[1]
    flat = np.concatenate([h for h in features.heads] + [np.zeros((mel, 0), np.float32)], axis=1)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, flat=flat, lengths=lengths, tails=features.tails)
    os.replace(tmp, path)


def _read(path: pathlib.Path, frames: int) -> Features:
    with np.load(path) as stored:
        flat, lengths, tails = stored["flat"], stored["lengths"], stored["tails"]
    heads = np.split(flat, np.cumsum(lengths)[:-1], axis=1)
    return Features(heads, tails, frames)
