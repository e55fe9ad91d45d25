"""Random rows of the pretokenized Arrow files by file reads equal those `datasets` gives."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from vqgpt.lm.arrow_rows import ArrowRows, grid_codes


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Two chunk folders (2,500 and 1,700 rows: several record batches each), concatenated."""
    root = tmp_path_factory.mktemp("arrow_rows")
    features = datasets.Features(
        {"codes": datasets.Array2D((3, 4), "int16"), "text": datasets.Value("string")}
    )
    rng = np.random.default_rng(0)
    parts = []
    for k, n in enumerate((2500, 1700)):
        codes = rng.integers(0, 1000, (n, 3, 4), dtype=np.int16)
        texts = [f"caption {k}-{i} " + "x" * int(rng.integers(0, 9)) for i in range(n)]
        ds = datasets.Dataset.from_dict({"codes": codes, "text": texts}, features=features)
        ds.save_to_disk(str(root / f"chunk-{k}"))
        parts.append(datasets.load_from_disk(str(root / f"chunk-{k}")))
    return datasets.concatenate_datasets(parts)


def test_rows_by_file_reads_equal_the_datasets_rows(split):
    reader = ArrowRows([f["filename"] for f in split.cache_files])
    assert len(reader) == len(split) == 4200
    assert len(reader.batches) > 2  # rows are found across record batches and files
    rows = [4199, 0, 2500, 2499, 17, 17, 3000, 999, 1000]  # unsorted, repeated, at the edges
    got = reader.take(rows, ["codes", "text"])
    want = split.with_format("numpy")[rows]
    assert np.array_equal(grid_codes(got["codes"], (3, 4)), want["codes"])
    assert got["text"].to_pylist() == list(want["text"])
    empty = reader.take([], ["codes", "text"])
    assert grid_codes(empty["codes"], (3, 4)).shape == (0, 3, 4)
    with pytest.raises(IndexError, match=r"\[0, 4200\)"):
        reader.take([4200], ["text"])
    reader.close()
