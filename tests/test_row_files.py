"""The one csv / tsv reader (train and predict), JSON lines, and bytes that are not UTF-8:
every problem names the file and the line it is on."""

from __future__ import annotations

import pytest

from finetune_jax.data import row_files
from finetune_jax.data.row_files import DataError


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return str(path)


def test_rows_keep_quoted_delimiters_and_the_line_each_row_starts_on(tmp_path):
    path = _write(tmp_path / "a.csv", 'text,label\n"a, b",x\n"two\nlines",y\nlast,z\n')
    rows = list(row_files.delimited_rows(path, ","))
    assert rows == [
        (2, {"text": "a, b", "label": "x"}),
        (3, {"text": "two\nlines", "label": "y"}),
        (5, {"text": "last", "label": "z"}),
    ]


@pytest.mark.parametrize("first", [True, False], ids=["first-data-row", "later-row"])
def test_an_unquoted_comma_is_an_error_naming_its_line(tmp_path, first):
    # pandas (datasets' csv builder) silently took the first field as an index when the
    # first data row had one field too many.
    rows = ["I did not expect to like it, but I loved it", "fine"]
    rows = rows if first else rows[::-1]
    path = _write(tmp_path / "new.csv", "sentence\n" + "\n".join(rows) + "\n")
    line = 2 if first else 3
    with pytest.raises(
        DataError,
        match=rf"new\.csv' line {line} as csv: 2 fields, but the header has 1 \(sentence\); a comma inside a text must be quoted",
    ):
        list(row_files.delimited_rows(path, ","))


def test_a_blank_line_and_an_unclosed_quote_name_their_lines(tmp_path):
    blank = _write(tmp_path / "blank.tsv", "a\tb\nx\ty\n\nz\tw\n")
    with pytest.raises(DataError, match=r"line 3 as tsv: the line is blank"):
        list(row_files.delimited_rows(blank, "\t"))
    unclosed = _write(tmp_path / "q.csv", 'a,b\nx,y\n"open,y\nz,w\n')
    with pytest.raises(DataError, match=r"line 3 as csv: .*quote opened there runs on to line 4"):
        list(row_files.delimited_rows(unclosed, ","))


def test_quote_none_reads_quotes_as_text(tmp_path):
    path = _write(tmp_path / "glue.tsv", 'sentence\tlabel\n"odd\t1\n')
    assert list(row_files.delimited_rows(path, "\t", quote_none=True)) == [
        (2, {"sentence": '"odd', "label": "1"})
    ]


def test_a_headerless_file_takes_the_given_names_and_starts_at_line_1(tmp_path):
    path = _write(tmp_path / "cola.tsv", "gj04\t1\t\tFine.\n")
    rows = list(row_files.delimited_rows(path, "\t", column_names=("s", "label", "o", "text")))
    assert rows == [(1, {"s": "gj04", "label": "1", "o": "", "text": "Fine."})]


def test_a_later_byte_that_is_not_utf8_names_line_and_byte_offset(tmp_path):
    # Far enough in that the first decoded buffer (8 KiB) is clean.
    body = "".join(f"row {i},x\n" for i in range(2000))
    path = _write(tmp_path / "latin1.csv", b"text,label\n" + body.encode() + b"caf\xe9,x\n")
    offset = len(b"text,label\n" + body.encode()) + 3
    with pytest.raises(DataError) as error:
        list(row_files.delimited_rows(path, ","))
    assert f"latin1.csv' line 2002, byte {offset}: b'\\xe9' is not UTF-8" in str(error.value)
    assert "iconv" in str(error.value)


def test_a_bad_byte_in_the_header_names_line_1(tmp_path):
    path = _write(tmp_path / "h.csv", b"t\xffext,label\nx,y\n")
    with pytest.raises(DataError, match=r"h\.csv' line 1, byte 1: b'\\xff' is not UTF-8"):
        row_files.header(path, ",")


def test_json_rows_name_the_file_line_of_a_broken_object(tmp_path):
    lines = ['{"text": "a"}'] * 8 + ["", '{"text": "broken', '{"text": "b"}']
    path = _write(tmp_path / "rows.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl' line 10: not valid JSON \(Unterminated"):
        list(row_files.json_rows(path))
    assert str(row_files.first_bad_json_line(path)).startswith(f"{path!r} line 10:")
    assert row_files.first_bad_json_line(_write(tmp_path / "ok.jsonl", '{"a": 1}\n')) is None


def test_line_index_follows_rows_that_span_lines():
    index = row_files.LineIndex(first=2)
    for row, line in enumerate([2, 3, 5, 6, 9]):
        index.add(row, line)
    assert [index.line(row) for row in range(5)] == [2, 3, 5, 6, 9]
    assert index.line(7) == 12  # past the last row added: one line a row
