"""A split's samples as one Arrow table: a column per ``Sample`` field instead of a Python object per
sample.

At Medical-Diff-VQA's size (700k questions) a list of ``Sample`` objects costs gigabytes per rank,
and every data-loader worker forked from it copies the pages it touches (reference counts are
written on every read). A ``SampleTable`` keeps the same values in Arrow buffers: strings in one
buffer per column, the text repeated across samples (questions, expert findings per image)
dictionary-encoded, nothing reference-counted per sample. Memory-mapped from the index cache
(``datamodules.index_cache``), its pages are the operating system's, shared by every rank on a node
and every worker. A ``Sample`` is made only when one is read (``table[i]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from datamodules.records import Sample

# Each Sample field's column; paths are strings, options a JSON object (its key order kept).
SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("task", pa.dictionary(pa.int32(), pa.string())),
    ("question_type", pa.dictionary(pa.int32(), pa.string())),
    ("question", pa.dictionary(pa.int32(), pa.string())),
    ("answer", pa.string()),
    ("image", pa.string()),
    ("prior_image", pa.string()),
    ("interval_days", pa.float64()),
    ("subject_id", pa.int64()),
    ("study_id", pa.int64()),
    ("prior_study_id", pa.int64()),
    ("short_answer", pa.string()),
    ("options", pa.string()),
    ("history", pa.string()),
    ("expert", pa.dictionary(pa.int32(), pa.string())),
])
FIELDS = tuple(field.name for field in fields(Sample))
assert FIELDS == tuple(SCHEMA.names), "SCHEMA must follow Sample's fields"
PATH_FIELDS = ("image", "prior_image")
ITER_ROWS = 65536

TEXT_FIELDS = ("question", "answer", "history", "expert")  # with the options, what a sample's length counts


def _array(values, field: pa.Field) -> pa.Array:
    """A column from a list, numpy array or pandas Series (None or NaN: no value), or as given."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, pd.Series):
        values = values.to_numpy(dtype=object) if values.dtype == object or str(values.dtype) in ("str", "string") \
            else values.to_numpy()
    if pa.types.is_dictionary(field.type):
        return pa.array(values, type=pa.string(), from_pandas=True).dictionary_encode()
    return pa.array(values, type=field.type, from_pandas=True)


class SampleTable(Sequence):
    """Samples as columns (``SCHEMA``). ``table[i]`` is the ``Sample``; ``table[a:b]`` a table.

    A table mapped from files (``map_files``) remembers them: pickled (for a data-loader worker
    started by spawn or forkserver rather than fork) it is mapped again from them, not copied."""

    def __init__(self, table: pa.Table, files: tuple[str, ...] | None = None):
        if not table.schema.equals(SCHEMA):
            raise ValueError(f"a sample table has the schema\n{SCHEMA}\nnot\n{table.schema}")
        self.arrow, self.files = table, files
        self._columns = [table.column(name) for name in FIELDS]

    @classmethod
    def map_files(cls, files) -> SampleTable:
        """The tables of Arrow IPC ``files``, one after another, memory-mapped (each map stays open
        while the table's buffers use it)."""
        files = tuple(str(file) for file in files)
        tables = [pa.ipc.open_file(pa.memory_map(file)).read_all() for file in files]
        return cls(pa.concat_tables(tables) if tables else cls.from_columns(0).arrow, files)

    def __reduce__(self):
        if self.files is not None:
            return SampleTable.map_files, (self.files,)
        return SampleTable, (self.arrow,)

    @classmethod
    def from_columns(cls, length: int, **columns) -> SampleTable:
        """A table of ``length`` samples from their columns (lists, arrays or Series); a field not
        given has no value in any sample."""
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise ValueError(f"not Sample fields: {sorted(unknown)}")
        arrays = []
        for field in SCHEMA:
            values = columns.get(field.name)
            array = pa.nulls(length, pa.string() if pa.types.is_dictionary(field.type) else field.type) \
                if values is None else _array(values, field)
            if pa.types.is_dictionary(field.type) and not pa.types.is_dictionary(array.type):
                array = array.dictionary_encode()
            if len(array) != length:
                raise ValueError(f"column {field.name} has {len(array)} values for {length} samples")
            arrays.append(array.cast(field.type))
        return cls(pa.Table.from_arrays(arrays, schema=SCHEMA))

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> SampleTable:
        columns = {name: [getattr(sample, name) for sample in samples] for name in FIELDS}
        for name in PATH_FIELDS:
            columns[name] = [None if path is None else str(path) for path in columns[name]]
        columns["options"] = [None if options is None else json.dumps(options) for options in columns["options"]]
        return cls.from_columns(len(samples), **columns)

    @classmethod
    def concat(cls, tables: Sequence[SampleTable]) -> SampleTable:
        if not tables:
            return cls.from_columns(0)
        # Zero-copy: each table's chunks (and dictionaries) stay where they are, mapped or not.
        mapped = all(table.files is not None for table in tables)
        return cls(pa.concat_tables([table.arrow for table in tables]),
                   sum((table.files for table in tables), ()) if mapped else None)

    def __len__(self) -> int:
        return self.arrow.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a sample table is sliced in order (step 1)")
            return SampleTable(self.arrow.slice(start, max(stop - start, 0)))
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of a table of {len(self)}")
        index %= len(self)
        return _sample(dict(zip(FIELDS, (column[index].as_py() for column in self._columns))))

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), ITER_ROWS):  # converted a block of columns at a time
            block = self.arrow.slice(start, ITER_ROWS)
            columns = [block.column(name).to_pylist() for name in FIELDS]
            for values in zip(*columns):
                yield _sample(dict(zip(FIELDS, values)))

    def __eq__(self, other) -> bool:
        if isinstance(other, SampleTable):
            return self.arrow.equals(other.arrow)
        return NotImplemented

    __hash__ = None

    def column(self, name: str) -> pa.ChunkedArray:
        return self.arrow.column(name)

    def with_column(self, name: str, values) -> SampleTable:
        """The table with field ``name`` replaced by ``values``."""
        field = SCHEMA.field(name)
        array = _array(values, field).cast(field.type)
        return SampleTable(self.arrow.set_column(SCHEMA.get_field_index(name), field, array))

    @property
    def nbytes(self) -> int:
        """The bytes its buffers take (what a rank holds, or maps, for it)."""
        return self.arrow.nbytes

    def has_prior(self) -> np.ndarray:
        return self.arrow.column("prior_image").is_valid().to_numpy(zero_copy_only=False)

    def text_chars(self) -> np.ndarray:
        """Per sample, the characters of its question, answer, history, expert text and options."""
        total = np.zeros(len(self), dtype=np.int64)
        for name in TEXT_FIELDS:
            total += _lengths(self.arrow.column(name))
        options = self.arrow.column("options")
        if options.null_count < len(options):  # MMXU's few questions: read one by one
            rows = np.flatnonzero(options.is_valid().to_numpy(zero_copy_only=False))
            for row, text in zip(rows, options.take(pa.array(rows)).to_pylist()):
                total[row] += sum(len(option) for option in json.loads(text).values())
        return total


def _sample(values: dict) -> Sample:
    for name in PATH_FIELDS:
        if values[name] is not None:
            values[name] = Path(values[name])
    if values["options"] is not None:
        values["options"] = json.loads(values["options"])
    return Sample(**values)


def _lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Characters per value (0 for none); a dictionary column's are counted once per distinct value."""
    parts = [np.zeros(0, dtype=np.int64)]
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            chunk_lengths = pc.take(pc.utf8_length(chunk.dictionary), chunk.indices)
        else:
            chunk_lengths = pc.utf8_length(chunk)
        parts.append(pc.fill_null(chunk_lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(parts)


def image_stems(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Each path's ``Path.stem`` (a MIMIC-CXR-JPG image's is its dicom_id); none for none."""
    names = pc.replace_substring_regex(paths, r"^.*/", "")
    return pc.replace_substring_regex(names, r"^(.+)\.[^.]+$", r"\1")  # ".jpg" and "a." keep their dot, as in Path


def one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The values as one array (a column read from a file or concatenated comes in chunks)."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
