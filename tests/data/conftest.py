"""Fixtures of the data tests: the captioned photographs in every format."""

from __future__ import annotations

from pathlib import Path

import pytest

CAPTIONED = Path(__file__).resolve().parents[1] / "fixtures" / "captioned"


@pytest.fixture(scope="session")
def captioned() -> Path:
    """tests/fixtures/captioned/ (scripts/make_captioned_fixtures.py): 30 real photos with
    captions as folder/ (metadata.jsonl), csv_folder/ (metadata.csv), parquet/ (2 files),
    webdataset/ ({00000..00002}.tar) and broken/00000.tar (one bad member of each kind)."""
    return CAPTIONED


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """datasets' cache (load_dataset writes Arrow files when not streaming) under the test's
    temporary folder, not ~/.cache."""
    import datasets

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache
