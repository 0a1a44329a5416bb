"""Marian's binary model format (`model.*.bin`), read and written with numpy.

The layout (Marian's `src/common/binary.cpp`, little-endian):

    uint64 version (1), uint64 n
    n headers of 4 x uint64: name length (with its NUL), type, shape rank, data bytes
    the n names (NUL-terminated), then the n shapes (int32 per dimension)
    uint64 offset, then `offset` zero bytes: the data starts on a 256-byte boundary
    the n data blocks, each padded with zeros to a multiple of 256 bytes

Types are Marian's `Type` codes (browsermt's marian-dev, which wrote the Bergamot models):
float32 0x404, int8 0x101, ..., and `intgemm8` 0x4101: int8 values quantized with the
matrix's own multiplier (127 / max |W|), then that multiplier as one float32. An intgemm8
matrix `W` [rows, cols] (x @ W) is stored transposed ([cols, rows], intgemm's B layout), except
the embedding `Wemb`, stored as it is ([vocab, dim]) because it is also looked up by row.
The `special:model.yml` item holds the architecture options as YAML text (type int8).
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

VERSION = 1
ALIGNMENT = 256
INTGEMM8 = 0x4101
FLOAT32 = 0x404
INT8 = 0x101
MODEL_YML = "special:model.yml"
# Marian type code -> numpy dtype of plain (not quantized) items.
PLAIN_TYPES = {
    0x101: np.int8,
    0x102: np.int16,
    0x104: np.int32,
    0x108: np.int64,
    0x201: np.uint8,
    0x202: np.uint16,
    0x204: np.uint32,
    0x208: np.uint64,
    0x402: np.float16,
    FLOAT32: np.float32,
    0x408: np.float64,
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One named tensor of a Marian model file: its type code, shape and raw bytes (without
    the alignment padding)."""

    name: str
    type: int
    shape: tuple[int, ...]
    data: bytes

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_items(path: str | os.PathLike) -> dict[str, Item]:
    """Every item of a Marian binary model file, by name, in file order."""
    with open(path, "rb") as f:
        blob = f.read()
    version, count = struct.unpack_from("<QQ", blob, 0)
    if version != VERSION:
        raise ValueError(f"{path}: Marian binary format version {version}, expected {VERSION}")
    headers = np.frombuffer(blob, "<u8", count=4 * count, offset=16).reshape(count, 4)
    position = 16 + 32 * count
    names = []
    for name_length, *_ in headers:
        names.append(blob[position : position + int(name_length) - 1].decode("utf-8"))
        position += int(name_length)
    shapes = []
    for _, _, rank, _ in headers:
        shapes.append(tuple(int(n) for n in np.frombuffer(blob, "<i4", int(rank), position)))
        position += 4 * int(rank)
    (offset,) = struct.unpack_from("<Q", blob, position)
    position += 8 + offset
    items = {}
    for name, (_, kind, _, length), shape in zip(names, headers, shapes, strict=True):
        item = Item(name, int(kind), shape, b"")
        used = _payload_bytes(item)
        if used > length or position + length > len(blob):
            raise ValueError(f"{path}: item {name!r} {shape} needs {used} bytes, has {length}")
        items[name] = dataclasses.replace(item, data=blob[position : position + used])
        position += int(length)
    return items


def _payload_bytes(item: Item) -> int:
    """Bytes an item's values take: intgemm8 adds its float32 multiplier; the model.yml text
    (and any other plain item) its elements times their size."""
    if item.type == INTGEMM8:
        return item.size + 4
    if item.type not in PLAIN_TYPES:
        raise ValueError(
            f"item {item.name!r} has Marian type {item.type:#x}, which is not supported"
        )
    return item.size * np.dtype(PLAIN_TYPES[item.type]).itemsize


def is_embedding(name: str) -> bool:
    """Marian keeps embedding matrices untransposed in the intgemm8 layout."""
    return "Wemb" in name


def quantized(item: Item) -> tuple[np.ndarray, float]:
    """An intgemm8 matrix as (int8 values in x @ W layout [rows, cols], multiplier)."""
    if item.type != INTGEMM8:
        raise ValueError(f"item {item.name!r} (type {item.type:#x}) is not an intgemm8 matrix")
    rows, cols = int(np.prod(item.shape[:-1])), item.shape[-1]
    values = np.frombuffer(item.data, np.int8, item.size)
    (multiplier,) = struct.unpack_from("<f", item.data, item.size)
    if is_embedding(item.name):
        return values.reshape(rows, cols), multiplier
    return values.reshape(cols, rows).T, multiplier


def scalar(item: Item) -> float:
    """A one-element item's value (e.g. `<matrix>_QuantMultA`) as float32. The Bergamot
    files store `Wemb_QuantMultA` as a one-element intgemm8 "matrix" (127, then its
    multiplier): its value is then the dequantized one."""
    if item.size != 1:
        raise ValueError(f"item {item.name!r} has shape {item.shape}, not a scalar")
    return float(to_float32(item).reshape(-1)[0])


def to_float32(item: Item) -> np.ndarray:
    """An item's values as float32 in its shape (x @ W layout): intgemm8 dequantized as
    int8 / multiplier, exactly the values the engine's int8 arithmetic multiplies with."""
    if item.type == INTGEMM8:
        values, multiplier = quantized(item)
        return (values.astype(np.float32) / np.float32(multiplier)).reshape(item.shape)
    array = np.frombuffer(item.data, PLAIN_TYPES[_plain(item)], item.size)
    return array.astype(np.float32).reshape(item.shape)


def _plain(item: Item) -> int:
    if item.type not in PLAIN_TYPES:
        raise ValueError(f"item {item.name!r} has Marian type {item.type:#x}, not a plain type")
    return item.type


def model_yml(items: dict[str, Item]) -> str:
    """The architecture options (YAML text) of a model file."""
    if MODEL_YML not in items:
        raise ValueError(f"the model file has no {MODEL_YML!r} item (architecture options)")
    return items[MODEL_YML].data.split(b"\0", 1)[0].decode("utf-8")


def float32_item(name: str, value: np.ndarray) -> Item:
    """A float32 item; 1-D values get Marian's row-vector shape [1, n]."""
    value = np.ascontiguousarray(value, np.float32)
    shape = (1, value.shape[0]) if value.ndim == 1 else value.shape
    return Item(name, FLOAT32, tuple(shape), value.tobytes())


def intgemm8_item(name: str, value: np.ndarray) -> Item:
    """A matrix (x @ W layout) quantized as Marian's converter does: multiplier
    127 / max |W|, values rounded to nearest and clipped to [-127, 127], the multiplier after
    them; stored transposed unless it is an embedding."""
    value = np.asarray(value, np.float32)
    multiplier = np.float32(127.0) / np.float32(np.abs(value).max())
    values = np.clip(np.rint(value * multiplier), -127, 127).astype(np.int8)
    stored = values if is_embedding(name) else values.T
    data = np.ascontiguousarray(stored).tobytes() + struct.pack("<f", multiplier)
    return Item(name, INTGEMM8, tuple(value.shape), data)


def yml_item(text: str) -> Item:
    """The `special:model.yml` item (NUL-terminated YAML text, type int8)."""
    data = text.encode("utf-8") + b"\0"
    return Item(MODEL_YML, INT8, (len(data),), data)


def write_items(path: str | os.PathLike, items: list[Item]) -> None:
    """Writes items as Marian does (`saveItems`): after a header padded to a 256-byte
    boundary, each tensor's data zero-padded to a multiple of 256 bytes."""
    # Marian pads tensors, not the options text (the last item of its files).
    padded = [
        len(item.data) if item.name == MODEL_YML else -(-len(item.data) // ALIGNMENT) * ALIGNMENT
        for item in items
    ]
    head = [struct.pack("<QQ", VERSION, len(items))]
    for item, length in zip(items, padded, strict=True):
        head.append(
            struct.pack("<QQQQ", len(item.name.encode()) + 1, item.type, len(item.shape), length)
        )
    head += [item.name.encode("utf-8") + b"\0" for item in items]
    head += [np.asarray(item.shape, "<i4").tobytes() for item in items]
    size = sum(len(part) for part in head)
    offset = ((size + 8) // ALIGNMENT + 1) * ALIGNMENT - size - 8
    with open(path, "wb") as f:
        f.write(b"".join(head) + struct.pack("<Q", offset) + b"\0" * offset)
        for item, length in zip(items, padded, strict=True):
            f.write(item.data + b"\0" * (length - len(item.data)))
