"""File readers with line-numbered errors: text files in a declared encoding, JSON lists, JSON lines and CSV.

Every problem is a :class:`~mmsenti.data.base.DataError` naming the file, line (and column or byte offset) and
what is wrong: a byte that is not the declared encoding, invalid JSON, a CSV row with the wrong number of fields or
an unterminated quote, a field a tokenizer cannot take (:func:`field_problem`). The dataset loaders, the data
doctor and batch prediction read files through these.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsenti.data.base import text_problem
from mmsenti.errors import DataError


def lookup_codec(encoding: str) -> codecs.CodecInfo:
    """The codec ``data.encoding`` names; an unknown name is a one-line :class:`DataError`."""
    try:
        return codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """A small per-post text file (original MVSA/TumEmo releases) as str.

    Under the default ``utf-8`` each file falls back to Windows-1252, then Latin-1: old Twitter dumps mix encodings
    file by file. Any other ``data.encoding`` is strict: a byte it cannot decode is an error naming the file."""
    raw = path.read_bytes()
    if lookup_codec(encoding).name != "utf-8":
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not {encoding} text: byte 0x{raw[e.start]:02x} at byte offset {e.start}; if the "
                            f"file uses another encoding, say which with data.encoding") from None
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")  # never fails: every byte is a code point


def field_problem(fields: Mapping[Any, Any]) -> str | None:
    """The first string value of a record that a tokenizer cannot take (:func:`text_problem`), or None.

    Every field is checked, not the text alone: an id or an image path without a UTF-8 encoding cannot be written
    to an output file or opened either. Names the field: ``'text' holds an unpaired UTF-16 surrogate ...``.
    """
    for name, value in fields.items():
        if isinstance(value, str) and (problem := text_problem(value)) is not None:
            return f"{name!r} {problem}" if isinstance(name, str) else f"element {name} {problem}"
    return None


ENCODING_ADVICE = "if the file uses another encoding, say which with data.encoding (e.g. cp1252 or latin-1)"


def _decode_error(path: Path, lineno: int, raw: bytes, err: UnicodeDecodeError, offset: int, encoding: str,
                  advice: str) -> DataError:
    return DataError(f"{path}:{lineno}: not {encoding} text: byte 0x{raw[err.start]:02x} at byte offset "
                     f"{offset + err.start} (column {err.start + 1}); {advice}")


def text_lines(path: Path, encoding: str = "utf-8", advice: str = ENCODING_ADVICE) -> Iterator[str]:
    """The lines of a text file, decoded, each with its line ending (what :mod:`csv` wants).

    A byte sequence that is not ``encoding`` is a :class:`DataError` naming the file, line and byte offset, never a
    bare ``UnicodeDecodeError``; ``advice`` ends it. A UTF-8 byte-order mark is skipped.
    """
    codec = lookup_codec(encoding)
    if "\n".encode(codec.name) != b"\n":  # UTF-16/32: bytes cannot be split at b"\n"; decode the whole file
        raw = path.read_bytes()
        try:
            text = raw.decode(codec.name)
        except UnicodeDecodeError as e:
            line = raw[: e.start].decode(codec.name, errors="replace").count("\n") + 1
            raise DataError(f"{path}:{line}: not {encoding} text at byte offset {e.start} ({e.reason}); "
                            f"{advice}") from None
        for line in _LINE_END.split(text):
            if line:
                yield from _split_cr(line)
        return
    first = "utf-8-sig" if codec.name == "utf-8" else codec.name
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(first if lineno == 1 else codec.name)
            except UnicodeDecodeError as e:
                raise _decode_error(path, lineno, raw, e, offset, encoding, advice) from None
            yield from _split_cr(text)
            offset += len(raw)


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")
_LINE_END = re.compile(r"(?<=\n)")


def _split_cr(text: str) -> list[str]:
    """A lone ``\\r`` ends a line too (old Mac / Excel for Mac files), as ``open(newline="")`` reads them for csv."""
    if "\r" not in text.replace("\r\n", ""):
        return [text]
    return [piece for piece in _LONE_CR.split(text) if piece]


def read_json_list(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """A JSON file holding a list of objects (the CLMLF format); errors name the file, line and column."""
    try:
        data = json.loads("".join(text_lines(path, encoding)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    for i, item in enumerate(data):
        if (problem := field_problem(item)) is not None:
            raise DataError(f"{path}: item {i}: {problem}")
    return data


def read_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(text_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if (problem := field_problem(obj)) is not None:  # JSON's \ud800 escapes make lone surrogates
            raise DataError(f"{path}:{lineno}: {problem}")
        yield lineno, obj


# A record spanning more lines than this is refused: an unterminated quote makes one field swallow the rows after it.
MAX_RECORD_LINES = 10


class _LineTap:
    """Passes numbered lines on to :mod:`csv`, remembers those a record was read from, and takes lines back: the
    rows an unterminated quote swallowed are then read again as rows of their own."""

    def __init__(self, lines: Iterator[str]):
        self.lines = enumerate(lines, 1)
        self.taken: list[tuple[int, str]] = []
        self.again: deque[tuple[int, str]] = deque()  # handed back: read before the file's next line

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self.again.popleft() if self.again else next(self.lines)
        self.taken.append(item)
        return item[1]

    def hand_back(self, lines: list[tuple[int, str]]) -> None:
        self.again.extendleft(reversed(lines))


def _complete_record(line: str, delimiter: str, width: int) -> bool:
    """Whether ``line`` on its own, quotes taken literally, has the header's number of fields."""
    return len(next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])) == width


def _misplaced_quote(lines: list[str], delimiter: str) -> bool:
    """Whether a quote in these lines is closed inside a field (``"a,b\nc,"d",e``: the record goes on after it),
    which :mod:`csv` reads silently and ``strict`` parsing refuses: a multi-line record that does this is a quote
    that was never closed, and the next quote in the file ended it."""
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return True
    return False


def _record_problem(row: dict[Any, Any], span: list[tuple[int, str]], width: int, delimiter: str,
                    max_record_lines: int) -> str | None:
    """What is wrong with a record :mod:`csv` read from the numbered lines ``span``, or None (see :func:`read_csv`)."""
    start, end = span[0][0], span[-1][0]
    extra = row.pop(None, None) or []
    short = sum(v is None for v in row.values())
    if extra or short:
        where = f" (the record runs from line {start} to line {end}: an unterminated quote on line {start}?)" \
            if end > start else ""
        return f"expected {width} fields, got {width + len(extra) - short}{where}"
    if end > start:
        if len(span) >= 3 and all(_complete_record(line, delimiter, width) for _, line in span):
            return (f"an unterminated quote on line {start} swallows lines {start + 1}-{end}, each of which is a row "
                    f"of its own")
        if _misplaced_quote([line for _, line in span], delimiter):
            return (f"an unterminated quote on line {start}? The record it opens runs to line {end}, where a quote "
                    f"ends it inside a field")
        if 0 < max_record_lines < end - start + 1:
            return (f"one record spans lines {start}-{end} ({end - start + 1} lines, more than {max_record_lines}): an "
                    f"unterminated quote on line {start}? (a longer quoted field is allowed with a larger "
                    f"data.max_record_lines)")
    return field_problem(row)


def _csv_records(path: Path, delimiter: str, required: Sequence[str], encoding: str, max_record_lines: int,
                 keep_going: bool, advice: str = ENCODING_ADVICE) -> Iterator[tuple[int, dict[str, str] | str]]:
    """:func:`read_csv` and :func:`iter_csv_rows`: ``(line, row)``, or ``(line, problem)`` with ``keep_going``."""
    tap = _LineTap(text_lines(path, encoding, advice))
    reader = csv.DictReader(tap, delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}:1: bad CSV header ({e})") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header)")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
    while True:
        tap.taken = []
        try:
            row: dict[str, str] | None = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as e:
            row, problem = None, f"bad CSV row ({e}; an unterminated quote?)"
        blank = next((i for i, (_, line) in enumerate(tap.taken) if line.strip("\r\n")), 0)  # empty lines csv skipped
        span = tap.taken[blank:]
        if row is not None:
            problem = _record_problem(row, span, len(header), delimiter, max_record_lines)
        if problem is None:
            yield span[0][0], row  # type: ignore[misc]
            continue
        if not keep_going:
            raise DataError(f"{path}:{span[0][0]}: {problem}")
        yield span[0][0], problem
        tap.hand_back(span[1:])  # the record's other lines: rows of their own when a quote swallowed them


def read_csv(path: Path, delimiter: str = ",", required: Sequence[str] = (), encoding: str = "utf-8",
             max_record_lines: int = MAX_RECORD_LINES) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for each data row of a CSV file with a header.

    A quoted field may span lines, but a field whose quote is never closed swallows the rows after it, which the
    :mod:`csv` module accepts silently. So these are errors naming the file and the record's first line: a row
    with more or fewer fields than the header; a record spanning more than ``max_record_lines`` lines (0: no
    limit on the lines, the other checks still apply); a record of 3 or more lines each of which is a complete row on its own; a record of several lines in
    which a quote closes inside a field; a field a tokenizer cannot take (:func:`field_problem`).
    """
    rows = _csv_records(path, delimiter, required, encoding, max_record_lines, keep_going=False)
    yield from rows  # type: ignore[misc]  # without keep_going every row is a dict


def iter_csv_rows(path: Path, delimiter: str = ",", encoding: str = "utf-8", max_record_lines: int = MAX_RECORD_LINES,
                  advice: str = ENCODING_ADVICE) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Like :func:`read_csv`, but a bad record gives ``(line, problem)`` and reading goes on (batch prediction).

    After a bad record that spans lines, its other lines are read again as rows of their own, so every row of the
    file is accounted for: the rows an unterminated quote swallowed are predicted, and the row holding the quote
    is reported. A file that cannot be decoded (``advice`` ends that message) or has no header still raises
    :class:`DataError`.
    """
    return _csv_records(path, delimiter, (), encoding, max_record_lines, keep_going=True, advice=advice)
