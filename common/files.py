"""Writing files so that nobody ever sees them half-written, and recovering append-only files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yields a hidden sibling of ``out`` to fill; when the block succeeds it replaces ``out`` (an
    existing one is removed first), when it fails it is deleted and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; what is written here is ordinary data
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yields a hidden path beside ``out`` to write; when the block succeeds it is renamed onto ``out``
    in one step, when it fails it is deleted and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(descriptor)
    staging = Path(name)
    staging.chmod(0o644)  # mkstemp makes it private; what is written here is ordinary data
    try:
        yield staging
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)


def whole_lines(path: Path) -> bytes:
    """The complete lines of an append-only file, cutting a torn last line (a write interrupted by a
    crash) off the file itself, so that appends start on a line boundary. Empty when absent."""
    if not path.is_file():
        return b""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        os.truncate(path, len(whole))
    return whole


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` beside `path`, flushed to disk, then rename it into place: readers see the old
    file or the new one, never a half-written one."""
    with atomic_file(path) as staging, open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: str | Path, obj) -> None:
    """Atomically write `obj` as indented JSON; NaN and infinities are refused (not valid JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str | Path, records) -> None:
    """Atomically write one JSON object per line."""
    lines = (json.dumps(record, allow_nan=False) + "\n" for record in records)
    write_text_atomic(path, "".join(lines))
