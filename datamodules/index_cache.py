"""The parsed sample tables on disk, so that a launch reads the dataset's files only when they changed.

A source's split is stored as an Arrow IPC file (``<key>.arrow``) with what its load reported beside
it (``<key>.json``). The key is a digest of everything the table is made from: the source's settings,
the DataModule's settings that shape the samples, each input file's fingerprint (its resolved path,
size, modification time and a hash of its first ``HEAD_BYTES``) and the code that makes tables (a hash
of ``CODE``'s files). A changed file, setting or loader is a new key; old entries are left for
``rm -r`` (each names its source and split in its ``.json``). A file is written under a temporary name
and published by a hard link, never over an entry that exists: a reader never sees half a file, and
when several machines build the same entry at once (one ``prepare_data`` per node on a shared
filesystem) the first one's stays, so no process has the file it maps replaced under it.

A stored table is memory-mapped, not read: its pages are the page cache's, shared by every process on
the machine that maps the file (ranks and their data-loader workers alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from datamodules.table import SampleTable

HEAD_BYTES = 1 << 16
# The modules whose code decides what a table holds for the same inputs and settings.
CODE = ("table.py", "index_cache.py", "datamodule.py", "sources.py", "diffvqa.py", "prognostic.py", "mimic.py",
        "mmxu.py", "experts.py", "enhance.py", "records.py")
RECORD_KEYS = ("source", "split", "loaded", "report")


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What tells a file from its changed self without reading it whole."""
    path = Path(path).resolve()
    stat = path.stat()
    with open(path, "rb") as file:
        head = hashlib.sha256(file.read(HEAD_BYTES)).hexdigest()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the code that makes tables (``CODE``), so that a changed loader builds its tables again."""
    digest = hashlib.sha256()
    for name in CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def cache_key(settings: dict[str, Any], inputs: list[str | Path]) -> str | None:
    """The digest naming a table made with ``settings`` from ``inputs``; None when an input is not a
    file (its loader then says what is wrong, as it does without a cache)."""
    if not all(Path(path).is_file() for path in inputs):
        return None
    described = {"code": code_version(), "settings": settings, "inputs": [fingerprint(path) for path in inputs]}
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
            if not isinstance(record, dict) or any(name not in record for name in RECORD_KEYS):
                return None
            return SampleTable.map_files([table_file]), record
        except (OSError, ValueError, pa.ArrowException):
            return None

    def store(self, key: str, table: SampleTable, record: dict[str, Any]) -> None:
        """Publishes the table, then its record (a record is only ever beside a whole table); an entry
        another process published first is kept."""
        self.directory.mkdir(parents=True, exist_ok=True)
        table_file, record_file = self.paths(key)
        _publish(table_file, lambda file: _write_table(file, table))
        _publish(record_file, lambda file: file.write(json.dumps(record, indent=1, sort_keys=True).encode()))


def _write_table(file, table: SampleTable) -> None:
    with pa.ipc.new_file(file, table.arrow.schema) as writer:
        writer.write_table(table.arrow)


def _publish(path: Path, write) -> None:
    """``write``s a temporary file and links it as ``path`` unless ``path`` exists (a filesystem
    without hard links gets it renamed into place)."""
    if path.exists():
        return
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another process published it first: theirs stays, ours is removed below
        except OSError:
            os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
