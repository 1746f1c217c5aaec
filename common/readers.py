"""Reading the files a person brings (CSV tables, gzipped or not; JSON Lines; plain text), where every
problem is an ``InputError`` that names the file, the line as a person opens it (1-based, the header
of a CSV being line 1), the field, what was found and what to do.

Loaders take an optional ``Problems``: without one, the first problem raises (training stops on bad
data); with one, a row's (first) problem is recorded, the row is left out, and reading goes on, so
``python -m datamodules.validate`` can report every problem of a copy in one run.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from common.errors import UsageError

EXAMPLES = 5  # problems of one kind listed before the rest are only counted
UTF8_FIX = "the file must be UTF-8: restore it from the original download, or convert it (iconv -t UTF-8)"


class InputError(UsageError, ValueError):
    """A problem in an input file. A report groups repeats of one ``kind`` of problem (by default,
    one about the same field) of one ``source`` (by default, the file)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, field: str | None = None,
                 fix: str | None = None, kind: str | None = None, source: str | None = None) -> None:
        self.path, self.problem, self.line, self.field, self.fix = Path(path), problem, line, field, fix
        self.kind = kind or (f"field {field}" if field else "the file")
        self.source = source or str(path)
        where = f"{path}" + (f" line {line}" if line is not None else "") + (f", field {field}" if field else "")
        super().__init__(f"{where}: {problem}" + (f"; {fix}" if fix else ""))


@dataclass
class Problems:
    """Input problems collected instead of raised, each kind listed up to ``listed`` times (None: all)."""

    examples: dict[tuple[str, str], list[InputError]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    listed: int | None = EXAMPLES

    def add(self, error: InputError) -> None:
        """Records ``error`` once: the same message again (a file read for each split) is not a new problem."""
        if str(error) in self.seen:
            return
        self.seen.add(str(error))
        key = (error.source, error.kind)
        self.counts[key] += 1
        examples = self.examples.setdefault(key, [])
        if self.listed is None or len(examples) < self.listed:
            examples.append(error)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One line per problem, or for a repeated kind its count and its first examples."""
        lines = []
        for key, examples in self.examples.items():
            count = self.counts[key]
            if count == 1:
                lines.append(str(examples[0]))
            else:
                shown = f"the first {len(examples)}" if count > len(examples) else "all"
                lines.append(f"{key[0]}: {count} problems with {key[1]} ({shown} listed):\n    "
                             + "\n    ".join(str(error) for error in examples))
        return lines


def raise_or_record(problems: Problems | None, error: InputError) -> None:
    """Raises ``error``, or records it when the caller collects problems (the row is then left out)."""
    if problems is None:
        raise error
    problems.add(error)


def read_all(problems: Problems | None, *reads):
    """Each ``read()``'s result. With ``problems``, every read is tried and each failure recorded
    before the first is raised, so that one unreadable file does not hide the problems of another."""
    results, failures = [], []
    for read in reads:
        try:
            results.append(read())
        except InputError as error:
            if problems is None:
                raise
            problems.add(error)
            failures.append(error)
    if failures:
        raise failures[0]
    return results


def read_text(path: str | Path, what: str) -> str:
    """The whole file decoded as UTF-8 (gunzipped first when its name ends in ``.gz``). A missing,
    truncated or corrupt file, or a byte that is not UTF-8, is an ``InputError``; ``what`` says what
    the file should be, for the message about a missing one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"not found: expected {what}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InputError(path, f"the gzip stream is truncated or corrupt ({error})",
                         fix="download the file again and check it against the release's SHA256SUMS.txt") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data, error) from None


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError) -> InputError:
    """Names the first byte that is not UTF-8 by line and column, and how many lines have one."""
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    bad_lines = sum(1 for raw in data.split(b"\n") if not _is_utf8(raw))
    others = f" ({bad_lines} lines have such bytes)" if bad_lines > 1 else ""
    return InputError(path, f"byte 0x{data[error.start]:02x} at column {column} is not UTF-8{others}", line=line,
                      fix=UTF8_FIX, kind="encoding")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Table:
    """A CSV file's rows (``frame``, index 0..n-1 in file order) and the line each row starts on."""

    path: Path
    frame: pd.DataFrame
    text: str = field(repr=False)

    @cached_property
    def _starts(self) -> list[int]:
        return _row_starts(self.text)

    def line(self, row: int) -> int:
        """The 1-based line of the file where data row ``row`` (0-based, as in ``frame``) starts."""
        return self._starts[row]

    def error(self, row: int, field: str, problem: str, fix: str | None = None, kind: str | None = None) -> InputError:
        return InputError(self.path, problem, line=self.line(row), field=field, fix=fix, kind=kind)

    def missing_values(self, columns: list[str], problems: Problems | None, fix: str) -> set[int]:
        """The rows with an empty required value, each reported (or raised) by its first such field."""
        bad: set[int] = set()
        for column in columns:
            for row in self.frame.index[self.frame[column].isna()]:
                if row not in bad:
                    raise_or_record(problems, self.error(row, column, "empty", fix=fix, kind=f"empty {column}"))
                    bad.add(row)
        return bad


def _csv_rows(text: str):
    """(first line, fields) of each row after the header, as ``csv`` reads them: a quoted value may
    span lines. A blank or whitespace-only line, which pandas skips, gives no row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader, None)
    previous_end = reader.line_num
    for row in reader:
        if row and not (len(row) == 1 and not row[0].strip()):
            yield previous_end + 1, row
        previous_end = reader.line_num


def _row_starts(text: str) -> list[int]:
    return [line for line, _ in _csv_rows(text)]


def _malformed_line(text: str) -> int | None:
    """The line of the first row with more fields than the header (what pandas refuses), if any."""
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    try:
        return next((line for line, row in _csv_rows(text) if len(row) > len(header)), None)
    except csv.Error:
        return None


def read_csv(path: str | Path, columns: list[str], what: str, dtype: dict | None = None) -> Table:
    """A CSV file (gzipped when named ``*.gz``) that must have ``columns`` and at least one row;
    ``what`` says what it should be. An empty file, a malformed row or a missing column is an
    ``InputError``. Only an empty field is missing (NaN): "NA" or "None" are kept as written."""
    path = Path(path)
    text = read_text(path, what)
    if not text.strip():
        raise InputError(path, f"the file is empty: expected {what}")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=dtype, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as error:
        # pandas' own line numbers miscount after a value that spans lines: the line is found with csv.
        raise InputError(path, f"malformed CSV ({str(error).strip()})", line=_malformed_line(text),
                         fix="each row needs the header's fields; quote a value holding a comma") from None
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise InputError(path, f"missing columns {missing} (found {list(frame.columns)})",
                         fix=f"expected {what} with the columns {columns}")
    if frame.empty:
        raise InputError(path, f"a header and no rows: expected {what}")
    return Table(path, frame.reset_index(drop=True), text)


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict | InputError]]:
    """(line number, the line's JSON object) for every non-blank line; a line that is not a JSON
    object gives an ``InputError`` in place of the object, for the caller to raise or record. A
    missing file, or one without a single line, is an ``InputError`` at once."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"not found: expected {what}")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(path, f"the file is empty: expected {what}, one JSON object per line")
    return _json_lines(path, data)


def _json_lines(path: Path, data: bytes) -> Iterator[tuple[int, dict | InputError]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            yield number, InputError(path, f"byte 0x{raw[error.start]:02x} at column {error.start + 1} is not UTF-8",
                                     line=number, fix=UTF8_FIX, kind="encoding")
            continue
        except json.JSONDecodeError as error:
            yield number, InputError(path, f"not JSON ({error})", line=number, kind="not JSON")
            continue
        if not isinstance(record, dict):
            yield number, InputError(path, f"a JSON {type(record).__name__}, not an object", line=number,
                                     kind="not JSON")
            continue
        yield number, record
