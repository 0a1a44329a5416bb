"""Read IDX files (the MNIST / Fashion-MNIST format), gzipped or plain, into numpy arrays.

Format (big-endian): two zero bytes, a type code, the number of dimensions D, D uint32
sizes, then the values in C order. Only the unsigned-byte type (0x08) is read: it is what
(Fashion-)MNIST images and labels use, and it lets the images stay uint8 in memory
(60,000 x 28 x 28 = 47 MB) until a batch needs them.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_UBYTE = 0x08


class IdxError(ValueError):
    """An IDX file is truncated, of another type, or disagrees with its partner file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (".gz" is decompressed)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # also a corrupt gzip stream
        raise IdxError(f"could not read IDX file {path!r}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{path!r} is not an IDX file (its first two bytes must be zero)")
    type_code, ndim = data[2], data[3]
    if type_code != _UBYTE:
        raise IdxError(
            f"{path!r} holds IDX type 0x{type_code:02x}; only unsigned bytes (0x08) are read"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path!r} is truncated inside its header ({ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(data) - header != expected:
        raise IdxError(
            f"{path!r} declares shape {shape} ({expected} values) but holds "
            f"{len(data) - header} bytes of values"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_images_and_labels(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, num_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W], int32 labels [N]) from a pair of IDX files, checked."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise IdxError(f"{os.fspath(images_path)!r}: images need 3 dims, got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxError(
            f"{os.fspath(labels_path)!r} holds labels of shape {labels.shape} but "
            f"{os.fspath(images_path)!r} holds {len(images)} images"
        )
    bad = np.flatnonzero(labels >= num_labels)
    if bad.size:
        raise IdxError(
            f"{os.fspath(labels_path)!r} row {bad[0]}: label {labels[bad[0]]} is not a class "
            f"id in 0..{num_labels - 1}"
        )
    return images, labels.astype(np.int32)
