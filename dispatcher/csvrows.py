"""A CSV file as campaign rows, one at a time, each with the file's own line number.

    rows = read_csv(open("people.csv", "rb"))   # or any iterable of bytes (or str) lines
    rows.columns                                 # the header, read at once
    for row in rows:                             # NumberedRow (a dict) or UnreadableRow
        ...

The header is line 1; a row is numbered by the line it starts on (a quoted field may span
lines). Nothing is held beyond the current row, so a file of any size streams in flat memory.
A line that cannot be read (not UTF-8, a stray quote, a NUL character, more or fewer fields
than the header) comes out as an UnreadableRow with its line and the reason; the rows after it are
read as usual. Blank lines are skipped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import ValidationError

ENCODING = "utf-8"


class NumberedRow(dict):
    """One row of the file: column -> value, and `line`, the line it starts on."""

    __slots__ = ("line",)

    def __init__(self, line: int, values: dict[str, str]) -> None:
        super().__init__(values)
        self.line = line


@dataclass(frozen=True)
class UnreadableRow:
    """A line that could not be read as a row of the header's columns."""

    line: int
    reason: str


class CsvRows:
    """The rows of a CSV source after its header (see the module docstring)."""

    def __init__(self, source: Iterable[bytes] | Iterable[str]) -> None:
        self._lines = _Lines(source)
        self._reader = csv.reader(self._lines, strict=True)
        self.columns = self._read_header()

    def _read_header(self) -> list[str]:
        while True:
            try:
                header = next(self._reader)
            except StopIteration:
                raise ValidationError("file", "is empty: the first line must be a header naming the columns") from None
            except csv.Error as exc:
                raise ValidationError("file", f"line 1: the header cannot be read ({exc})") from None
            bad = self._lines.bad_since(1)
            if bad:
                raise ValidationError("file", f"line {self._lines.number}: the header cannot be read: {bad}")
            if header:
                break
        columns = [c.strip() for c in header]
        if any(not c for c in columns):
            raise ValidationError("file", f"the header has an empty column name (columns: {', '.join(columns)})")
        seen: set[str] = set()
        for c in columns:
            if c in seen:
                raise ValidationError("file", f"the header names column {c!r} twice")
            seen.add(c)
        return columns

    def __iter__(self) -> Iterator[NumberedRow | UnreadableRow]:
        width = len(self.columns)
        while True:
            start = self._lines.number + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield UnreadableRow(start, f"unreadable CSV: {exc}")
                continue
            bad = self._lines.bad_since(start)
            if bad:
                yield UnreadableRow(start, bad)
                continue
            if not fields or (len(fields) == 1 and not fields[0].strip() and width > 1):
                continue  # a blank line
            if len(fields) != width:
                yield UnreadableRow(start, f"{len(fields)} field(s), the header has {width}")
                continue
            yield NumberedRow(start, dict(zip(self.columns, fields)))


def read_csv(source: Iterable[bytes] | Iterable[str]) -> CsvRows:
    """Read the header of `source` now and return its rows as an iterable (see CsvRows).

    Raises ValidationError (field `file`) when the header is missing or unreadable.
    """
    return CsvRows(source)


class _Lines:
    """Decodes lines one by one, counting them and remembering which failed to decode."""

    def __init__(self, source: Iterable[bytes] | Iterable[str]) -> None:
        self._it = iter(source)
        self.number = 0
        self._bad: tuple[int, str] | None = None  # the latest line that could not be read, and why

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        raw = next(self._it)
        self.number += 1
        if isinstance(raw, str):
            line = raw
        else:
            try:
                line = raw.decode(ENCODING)
            except UnicodeDecodeError:
                self._bad = (self.number, f"not valid {ENCODING}")
                line = raw.decode(ENCODING, errors="replace")
        if "\x00" in line:
            self._bad = (self.number, "contains a NUL character")
        if self.number == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a byte-order mark
        return line

    def bad_since(self, line: int) -> str | None:
        """Why a line at or after `line` could not be read, if one could not."""
        if self._bad is not None and self._bad[0] >= line:
            return self._bad[1]
        return None
