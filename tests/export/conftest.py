"""Fixtures of the export tests: a tiny trained LM run and its export, shared by the files here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqgpt.export.folder import ExportConfig, export_run

PREFIX = 24  # sequences.t2i_prefix_length of the exported LM: captions of 48 tokens do not fit


@pytest.fixture(scope="session")
def lm_run(tiny_tokenizer_run, tmp_path_factory, run_cli, tiny_lm_recipe, write_yaml) -> Path:
    """An LM run of two steps (t2i prefix PREFIX) over the tiny tokenizer."""
    root = tmp_path_factory.mktemp("export_lm")
    out = root / "run"
    recipe = tiny_lm_recipe(
        tiny_tokenizer_run,
        out,
        root / "codes",
        train=dict(max_steps=2, save_every=0),
        sequences=dict(t2i_prefix_length=PREFIX),  # the processor must pad t2i prompts the same
    )
    run_cli("train-lm", "--config", str(write_yaml(root / "r.yaml", recipe)))
    return out


@pytest.fixture(scope="session")
def exported(lm_run, tmp_path_factory) -> Path:
    """`lm_run` exported (no --metrics, no push)."""
    out = tmp_path_factory.mktemp("export_out") / "vqgpt-tiny"
    result = export_run(ExportConfig(str(lm_run), str(out)))
    assert result.folder == out and result.has_lm and result.url is None
    return out
