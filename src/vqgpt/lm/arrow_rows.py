"""Random rows of Arrow files read with plain file reads, not a memory map.

`datasets` memory-maps its Arrow files: every page a random read touches stays in the process's
resident set (as file-backed pages) until the kernel needs it back, so an LM epoch over a
500,000-row split ends with the whole file counted in its RSS (scripts/bench_lm_memory.py
measured +92 MiB between 10,000 and 500,000 rows of 8x8 codes, all of it file pages). Reading
the record batch that holds a row with `read()` instead costs one copy of that batch (1,000
rows: ~130 kB for 8x8 codes) that is freed afterwards, and RSS stays flat.

The files are Arrow IPC streams as `datasets` writes them (`save_to_disk`): a schema message,
then record batches. `ArrowRows` scans each file once to note where every record batch starts
and how many rows it holds (one sequential read), then reads whole batches by offset.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa


class BatchLocation(NamedTuple):
    file: int  # index into ArrowRows.files
    offset: int  # byte offset of the record batch message
    first_row: int  # its first row, counted over all files
    num_rows: int


class ArrowRows:
    """Rows of several Arrow IPC stream files (one table, files in order) by row number.

    Raises:
        ValueError: the files' schemas differ.
    """

    def __init__(self, files: Sequence[str]) -> None:
        import datasets  # noqa: F401  (registers its Arrow extension types: Array2D columns)

        self.files = [str(f) for f in files]
        self.batches: list[BatchLocation] = []
        self.schema: pa.Schema | None = None
        first = 0
        for number, path in enumerate(self.files):
            with pa.OSFile(path) as source:
                reader = pa.ipc.MessageReader.open_stream(source)
                schema = pa.ipc.read_schema(reader.read_next_message())
                if self.schema is None:
                    self.schema = schema
                elif not schema.equals(self.schema):
                    raise ValueError(f"{path}: its columns differ from those of {self.files[0]}")
                while True:
                    offset = source.tell()
                    try:
                        message = reader.read_next_message()
                    except StopIteration:
                        break
                    rows = pa.ipc.read_record_batch(message, schema).num_rows
                    if rows:
                        self.batches.append(BatchLocation(number, offset, first, rows))
                        first += rows
        self.num_rows = first
        self._starts = [b.first_row for b in self.batches]
        self._open: dict[int, pa.NativeFile] = {}

    def __len__(self) -> int:
        return self.num_rows

    @property
    def features(self):  # -> datasets.Features
        """The columns as `datasets` features (from the schema's metadata: Array2D keeps its
        shape)."""
        import datasets

        return datasets.Features.from_arrow_schema(self.schema)

    def _batch(self, index: int) -> pa.RecordBatch:
        where = self.batches[index]
        source = self._open.get(where.file)
        if source is None:
            source = self._open[where.file] = pa.OSFile(self.files[where.file])
        source.seek(where.offset)
        return pa.ipc.read_record_batch(pa.ipc.read_message(source), self.schema)

    def take(self, rows: Sequence[int], columns: Sequence[str]) -> dict[str, pa.Array]:
        """`columns` of `rows` (in the order asked, repeats allowed) as Arrow arrays.

        Raises:
            IndexError: a row outside [0, len).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(
                f"rows must be in [0, {self.num_rows}); got {rows.min()}..{rows.max()}"
            )
        which = np.array([bisect.bisect_right(self._starts, r) - 1 for r in rows], dtype=np.int64)
        parts: dict[str, list[pa.Array]] = {c: [] for c in columns}
        positions = []
        for index in np.unique(which):
            mask = which == index
            batch = self._batch(int(index))
            local = pa.array(rows[mask] - self.batches[index].first_row)
            for column in columns:
                parts[column].append(batch.column(column).take(local))
            positions.append(np.flatnonzero(mask))
        if not positions:
            return {c: pa.array([], type=self.schema.field(c).type) for c in columns}
        # rows came out grouped by batch: put them back in the order asked for
        order = np.argsort(np.concatenate(positions), kind="stable")
        return {c: pa.concat_arrays(parts[c]).take(pa.array(order)) for c in columns}

    def close(self) -> None:
        """Close the open files (they reopen on the next read)."""
        for source in self._open.values():
            source.close()
        self._open.clear()


def grid_codes(array: pa.Array, grid: Sequence[int]) -> np.ndarray:
    """A `datasets` Array2D/Array3D column (nested lists of ints) as an array [n, *grid]."""
    storage = array.storage if isinstance(array, pa.ExtensionArray) else array
    values = storage
    for _ in grid:
        values = values.flatten()
    flat = np.array(values.to_numpy(zero_copy_only=False))  # a writable copy
    return flat.reshape(len(array), *grid)


def ragged_grid_codes(array: pa.Array, grid: Sequence[int]) -> list[np.ndarray]:
    """A `datasets` Array3D (None, h, w) column (a list of grids per row) as one array
    [n_i, *grid] per row."""
    storage = array.storage if isinstance(array, pa.ExtensionArray) else array
    counts = storage.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    values = storage.flatten()  # every row's grids, one after another
    flat = grid_codes(values, grid) if len(values) else np.zeros((0, *grid), dtype=np.int64)
    return np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []


__all__ = ["ArrowRows", "BatchLocation", "grid_codes", "ragged_grid_codes"]
