"""The parsed sample tables on disk, so that a launch reads the dataset's files only when they changed.

A source's split is stored as an Arrow IPC file (``<key>.arrow``) with what its load reported beside
it (``<key>.json``). The key is a digest of everything the table is made from: the source's settings,
the DataModule's settings that shape the samples, and each input file's fingerprint (its resolved
path, size, modification time and a hash of its first ``HEAD_BYTES``). A changed file, setting or
``SCHEMA_VERSION`` is a new key; old entries are left for ``rm -r`` (each names its source and split in
its ``.json``). Files are written to a temporary name and renamed, so a reader never sees half a file
and two ranks building the same entry at once both leave a whole one.

A stored table is memory-mapped, not read: its pages are the page cache's, shared by every process on
the machine that maps the file (ranks and their data-loader workers alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from datamodules.table import SampleTable

SCHEMA_VERSION = 1  # raise it when what a table holds for the same inputs changes
HEAD_BYTES = 1 << 16


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What tells a file from its changed self without reading it whole."""
    path = Path(path).resolve()
    stat = path.stat()
    with open(path, "rb") as file:
        head = hashlib.sha256(file.read(HEAD_BYTES)).hexdigest()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


def cache_key(settings: dict[str, Any], inputs: list[str | Path]) -> str:
    """The digest naming a table made with ``settings`` from ``inputs``."""
    described = {"schema": SCHEMA_VERSION, "settings": settings, "inputs": [fingerprint(path) for path in inputs]}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


class IndexCache:
    """Sample tables and their load reports under ``directory``, by key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.arrow", self.directory / f"{key}.json"

    def load(self, key: str) -> tuple[SampleTable, dict[str, Any]] | None:
        """The stored table (memory-mapped) and its record, or None when there is none (or it cannot
        be read: it is then built again)."""
        table_file, record_file = self.paths(key)
        try:
            record = json.loads(record_file.read_text())
            # The map stays open while the table's buffers use it.
            table = pa.ipc.open_file(pa.memory_map(str(table_file))).read_all()
            return SampleTable(table), record
        except (OSError, ValueError, pa.ArrowException):
            return None

    def store(self, key: str, table: SampleTable, record: dict[str, Any]) -> None:
        """Writes the table, then its record: a record is only ever beside a whole table."""
        self.directory.mkdir(parents=True, exist_ok=True)
        table_file, record_file = self.paths(key)
        _atomic(table_file, lambda file: _write_table(file, table))
        _atomic(record_file, lambda file: file.write(json.dumps(record, indent=1, sort_keys=True).encode()))


def _write_table(file, table: SampleTable) -> None:
    with pa.ipc.new_file(file, table.arrow.schema) as writer:
        writer.write_table(table.arrow)


def _atomic(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
