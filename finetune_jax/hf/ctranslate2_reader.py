"""Read a CTranslate2 `model.bin` into numpy arrays, with no CTranslate2 code.

The binary layout (version 6, as `ctranslate2.specs.model_spec.ModelSpec._serialize` writes it;
all integers little-endian): uint32 binary version; string spec name; uint32 spec revision;
uint32 variable count, then per variable: string name, uint8 rank, uint32 x rank shape,
uint8 dtype id (float32, int8, int16, int32, float16, bfloat16), uint32 byte count, the raw
bytes; uint32 alias count, then per alias: string alias, string name of the variable it
stands for (CTranslate2 stores a duplicated tensor once, e.g. a tied output projection).
A string is uint16 length including a trailing NUL, the UTF-8 bytes, the NUL.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import ml_dtypes
import numpy as np

SUPPORTED_VERSIONS = (5, 6)  # 6 adds nothing to the layout read here
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class CTranslate2Model:
    """The contents of a model.bin: spec name and revision, variables by name (scalars as
    0-d arrays), and aliases (alias name -> the variable name it shares storage with)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following an alias; a KeyError names the file's spec."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"{self.spec} model.bin has no variable {name!r}")
        return self.variables[name]


class _Cursor:
    """Little-endian reads from a bytes buffer, with the offset in errors."""

    def __init__(self, data: bytes, path: str):
        self.data, self.offset, self.path = data, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.offset} (needs {size} more)")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = self.take(length)
        return raw[:-1].decode("utf-8")  # drop the trailing NUL

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.offset} (needs {size} more)")
        raw = self.data[self.offset : self.offset + size]
        self.offset += size
        return raw


def read_model_bin(path: str | os.PathLike) -> CTranslate2Model:
    """Parses a CTranslate2 model.bin; values keep their stored dtype."""
    path = str(path)
    with open(path, "rb") as file:
        cursor = _Cursor(file.read(), path)
    version = cursor.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version}, this reader knows {SUPPORTED_VERSIONS}"
        )
    spec, revision = cursor.string(), cursor.unpack("I")
    variables = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        shape = tuple(cursor.unpack("I") for _ in range(cursor.unpack("B")))
        type_id, size = cursor.unpack("B"), cursor.unpack("I")
        if type_id >= len(_DTYPES):
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        raw = cursor.take(size)
        variables[name] = np.frombuffer(raw, _DTYPES[type_id]).reshape(shape)
    aliases = {}
    for _ in range(cursor.unpack("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.offset != len(cursor.data):
        raise ValueError(f"{path}: {len(cursor.data) - cursor.offset} bytes after the aliases")
    return CTranslate2Model(spec, revision, variables, aliases)
