"""Chat records from files: GSM8K jsonl, `messages` jsonl, Alpaca-style json/jsonl -> conversations.

Plain `json` rather than HF `datasets`: a bad record's error names its file and 1-based line,
which a dataset built from the whole file no longer knows.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterator

from finetune_jax.data import row_files
from finetune_jax.data.text_sources import DataError

FORMATS = ("auto", "gsm8k", "messages", "alpaca")
ROLES = ("system", "user", "assistant")

Conversation = list[dict[str, str]]


def load_records(
    path_or_dir: str | os.PathLike,
    fmt: str = "auto",
    *,
    split: str = "train",
    limit: int | None = None,
) -> list[Conversation]:
    """Reads a JSON-lines file or a JSON array file into conversations, in file order.

    Formats: "gsm8k" ({question, answer}: user, assistant), "messages" ({"messages": [{role,
    content}, ...]}), "alpaca" ({instruction, input?, output}: user = instruction, plus
    "\\n\\n" + input when input is non-empty; assistant = output). "auto" picks the format
    from the first record's keys. A directory means its `{split}.jsonl` or `{split}.json`.
    `limit` keeps the first `limit` records. Plain `json` rather than HF `datasets`: these
    files are small, and every malformed row must be reported with its 1-based line number.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    path = _resolve_file(pathlib.Path(path_or_dir), split)
    conversations = []
    for line, record in _read_json_records(path, limit):
        if not isinstance(record, dict):
            raise DataError(f"{path!r} line {line}: expected a JSON object, got {record!r:.80}")
        if fmt == "auto":
            fmt = _detect_format(record, path, line)
        conversations.append(_CONVERTERS[fmt](record, path, line))
    if not conversations:
        raise DataError(f"{path!r} holds no records")
    return conversations


def _resolve_file(path: pathlib.Path, split: str) -> str:
    if path.is_dir():
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                return str(path / f"{split}{suffix}")
        present = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        raise DataError(
            f"directory {str(path)!r} has no {split}.jsonl or {split}.json (JSON files "
            f"present: {present or 'none'}); pass the file itself or another split"
        )
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    return str(path)


def _read_json_records(path: str, limit: int | None) -> Iterator[tuple[int, object]]:
    """(1-based line, record) for a JSON array file or a JSON-lines file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise row_files.undecodable(path, e) from None
    if text.lstrip().startswith("["):
        yield from _json_array_records(text, path, limit)
        return
    count = 0
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines breaks on.
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        if limit is not None and count >= limit:
            return
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path!r} line {number}: invalid JSON ({e.msg}, column {e.colno}); a JSON-lines "
                "file holds one object per line"
            ) from e
        count += 1
        yield number, record


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_array_records(text: str, path: str, limit: int | None) -> Iterator[tuple[int, object]]:
    """Decodes array elements one by one, so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    position = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted_to, count = 1, 0, 0
    while not text.startswith("]", position) and (limit is None or count < limit):
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataError(f"{path!r} line {e.lineno}: invalid JSON ({e.msg})") from e
        count += 1
        yield line, record
        position = _WHITESPACE.match(text, position).end()
        if text.startswith(",", position):
            position = _WHITESPACE.match(text, position + 1).end()
        elif not text.startswith("]", position):
            at = line + text.count("\n", counted_to, position)
            raise DataError(f"{path!r} line {at}: expected ',' or ']' after an array element")


def _detect_format(record: dict, path: str, line: int) -> str:
    if "messages" in record:
        return "messages"
    if {"question", "answer"} <= record.keys():
        return "gsm8k"
    if {"instruction", "output"} <= record.keys():
        return "alpaca"
    raise DataError(
        f"{path!r} line {line}: cannot tell the format from keys {sorted(record)}; expected "
        "'messages', 'question'+'answer' (gsm8k) or 'instruction'+'output' (alpaca)"
    )


def _text(record: dict, key: str, path: str, line: int, fmt: str, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise DataError(
            f"{path!r} line {line}: missing key {key!r} for the {fmt} format; found keys "
            f"{sorted(record)}"
        )
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{path!r} line {line}: {key!r} must be a string, got {value!r:.80}")
    return value


def _from_gsm8k(record: dict, path: str, line: int) -> Conversation:
    return [
        {"role": "user", "content": _text(record, "question", path, line, "gsm8k")},
        {"role": "assistant", "content": _text(record, "answer", path, line, "gsm8k")},
    ]


def _from_alpaca(record: dict, path: str, line: int) -> Conversation:
    prompt = _text(record, "instruction", path, line, "alpaca")
    extra = _text(record, "input", path, line, "alpaca", optional=True)
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    answer = _text(record, "output", path, line, "alpaca")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _from_messages(record: dict, path: str, line: int) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path!r} line {line}: 'messages' must be a non-empty list")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(
                f"{path!r} line {line}: messages[{i}] needs a 'role' in {ROLES}, got {message!r:.80}"
            )
        content = _text(message, "content", path, line, f"messages[{i}]")
        conversation.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" for m in conversation):
        raise DataError(f"{path!r} line {line}: no assistant message, so nothing to train on")
    return conversation


_CONVERTERS = {"gsm8k": _from_gsm8k, "alpaca": _from_alpaca, "messages": _from_messages}
