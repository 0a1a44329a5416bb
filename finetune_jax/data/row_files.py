"""Rows of csv / tsv and JSON-lines files, read one way for `train` and `predict`.

`delimited_rows` is the one csv / tsv reader: train's text splits (`text_sources`) and
predict's / monitor's inputs (`prediction_io`) both go through it, so a file one accepts the
other reads the same, and a file one rejects the other rejects with the same message. It is
the standard library's `csv` parser with one rule added: every row has as many fields as the
header. pandas' parser (under `datasets`' csv builder) takes the first column as an index
when the first data row has one field too many, so `a text, with a comma,label` lost its
first words and shifted every later row: nothing there can make that an error.

Every error is a `DataError` naming the file and the line a row starts on (a quoted cell may
span lines), and a byte that is not UTF-8 is reported with its line and byte offset.
"""

from __future__ import annotations

import bisect
import csv
import json
from collections.abc import Iterator, Sequence
from typing import Any


class DataError(ValueError):
    """A data file or hub split is missing, malformed or holds an invalid label.

    Defined here, the lowest of the data readers, and re-exported by `text_sources`, where
    the rest of the package imports it from."""


# Python's csv refuses cells over 128 KiB by default; a long document in one cell is data.
csv.field_size_limit(2**31 - 1)


def delimited_rows(
    path: str,
    delimiter: str,
    quote_none: bool = False,
    column_names: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line the row starts on, {column: cell}) for every row of a csv / tsv file.

    The first line names the columns (a UTF-8 BOM is dropped) unless `column_names` are
    given (a headerless file: its first row is line 1). `quote_none` reads `"` as an
    ordinary character (GLUE's TSV files hold unbalanced quotes); otherwise a cell may be
    quoted ("a, b"). A row with another number of fields than the header, a blank line
    and a byte that is not UTF-8 are errors naming the line.
    """
    file_format = "tsv" if delimiter == "\t" else "csv"
    quoting = csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        names, last_line = list(column_names or []), 0
        try:
            for fields in reader:
                line, last_line = last_line + 1, reader.line_num
                if not names:
                    names = [name.strip() for name in fields]
                    if not any(names):
                        raise DataError(f"{path!r} line {line}: the header line is blank")
                    continue
                if len(fields) != len(names):
                    problem = _field_count_problem(
                        path, line, last_line, file_format, fields, names
                    )
                    raise DataError(problem)
                yield line, dict(zip(names, fields))
        except UnicodeDecodeError as e:
            raise undecodable(path, e) from None
        except csv.Error as e:  # a NUL byte; a quote that never closes
            raise DataError(
                f"could not parse {path!r} from line {last_line + 1} as {file_format}: {e} (a quote "
                'that never closes? quote a whole cell, "like ""this""", or none of it)'
            ) from None


def header(path: str, delimiter: str, quote_none: bool = False) -> list[str]:
    """The column names on the first line of a csv / tsv file, as `delimited_rows` reads
    them (stripped, BOM dropped)."""
    quoting = csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            names = next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])
        except UnicodeDecodeError as e:
            raise undecodable(path, e) from None
        except csv.Error as e:
            raise DataError(f"could not parse the header line of {path!r}: {e}") from None
    names = [name.strip() for name in names]
    if not any(names):
        raise DataError(f"{path!r} line 1: the header line is blank")
    return names


def _field_count_problem(
    path: str, line: int, last_line: int, file_format: str, fields: list[str], names: list[str]
) -> str:
    where = f"could not parse {path!r} line {line} as {file_format}"
    if not fields:
        return f"{where}: the line is blank; remove it (every row needs {_count(names)})"
    if last_line > line:  # a quoted cell ran over line ends
        hint = f"a quote opened there runs on to line {last_line}: close it"
    elif file_format == "csv":
        hint = 'a comma inside a text must be quoted ("a, b"), or save the file as .tsv'
    else:
        hint = "a tab inside a text must be quoted"
    return (
        f"{where}: {_count(fields)}, but the header has {len(names)} ({', '.join(names)}); {hint}"
    )


def _count(fields: Sequence[str]) -> str:
    return f"{len(fields)} field{'' if len(fields) == 1 else 's'}"


class LineIndex:
    """Which line each row of a file starts on, kept compactly: the rows after which the
    count stops being `first + row` (a quoted cell spanning lines), as (row, line) pairs."""

    def __init__(self, first: int):
        self._rows, self._lines = [0], [first]

    def add(self, row: int, line: int) -> None:
        """Records that row `row` (0-based) starts on `line`; call in row order."""
        if line != self.line(row):
            self._rows.append(row)
            self._lines.append(line)

    def line(self, row: int) -> int:
        """The line row `row` (0-based) starts on."""
        i = bisect.bisect_right(self._rows, row) - 1
        return self._lines[i] + row - self._rows[i]


def json_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for every non-blank line of a JSON-lines file; a line that is not a
    JSON object, or not UTF-8, is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        try:
            # A file's lines, unlike str.splitlines, do not break at U+2028 (JSON text may hold it).
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, json_object(line, path, number)
        except UnicodeDecodeError as e:
            raise undecodable(path, e) from None


def json_object(line: str, path: str, number: int) -> dict[str, Any]:
    """One JSON-lines line as a dict, or an error naming file, line and column."""
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path!r} line {number}: not valid JSON ({e.msg}: column {e.colno}); a "
            "JSON-lines file holds one complete object per line"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{path!r} line {number}: expected a JSON object, got {row!r:.60}")
    return row


def json_line_of_row(path: str, row: int) -> int:
    """The line of `path` that holds JSON-lines row `row` (0-based): readers skip blank lines,
    so a row's index is not its line. Reads the file up to that line (for error messages)."""
    seen = -1
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return number
    return row + 1


def first_bad_json_line(path: str) -> DataError | None:
    """The error for the first line of `path` that is not a JSON object, or None: names the
    culprit when a faster reader (arrow's) only says that one exists."""
    try:
        for _ in json_rows(path):
            pass
    except DataError as e:
        return e
    return None


def undecodable(path: str, error: UnicodeDecodeError) -> DataError:
    """`error` (raised somewhere in reading `path` as text) as a DataError naming the file,
    the line and the byte offset of the first bytes that are not valid UTF-8."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.end]
                return DataError(
                    f"{path!r} line {number}, byte {offset + e.start}: {bad!r} is not UTF-8 "
                    f"({e.reason}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                )
            offset += len(raw)
    return DataError(f"{path!r} is not UTF-8 text ({error}); save it as UTF-8")
