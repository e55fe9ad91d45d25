"""Tests for scripts/bench_lm.py: its row plan, its batches and a real --quick run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env
from transformers import GPT2Config

from vqgpt.lm import LM_PRESETS, flops_per_token, round_up

SCRIPT = ROOT / "scripts" / "bench_lm.py"


@pytest.fixture(scope="module")
def bench():
    """scripts/bench_lm.py as a module (registered so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location("bench_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lm"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_lm"]


@pytest.mark.parametrize(
    "device, compile_, n_rows",
    [("cpu", False, 3), ("cpu", True, 5), ("cuda", False, 5), ("cuda", True, 9)],
)
def test_plan_rows(bench, device, compile_, n_rows):
    rows = bench.plan_rows(device, compile_)
    assert len(rows) == n_rows
    assert [r.name for r in rows[:3]] == ["plain HF", "shipped full", "shipped split"]
    assert rows[0].path == "plain" and not rows[0].compile
    assert sum(r.precision == "bf16" for r in rows) == (0 if device == "cpu" else 2 + 2 * compile_)
    compiled = [r for r in rows if r.compile]
    assert len(compiled) == (n_rows - 1) // 2 * compile_  # one per shipped row when asked
    assert all(r.path == "shipped" for r in compiled)


@pytest.mark.parametrize("fraction", [0.0, 0.75, 1.0])
def test_make_batch_id_ranges(bench, fraction):
    batch, seq_len, k = 3, 41, 32
    ids = bench.make_batch(batch, seq_len, k, fraction, seed=0)
    image_offset = 50257 + 2
    assert ids.shape == (batch, seq_len)
    assert (ids[:, 0] == 50256).all()
    is_image = ids[:, 1:] >= image_offset
    assert (is_image.sum(1) == round(fraction * (seq_len - 1))).all()
    assert (ids < image_offset + k).all() and (ids >= 0).all()
    # image codes come last: once a row reaches them it stays there
    assert (is_image[:, 1:].int() >= is_image[:, :-1].int()).all()
    assert (bench.make_batch(batch, seq_len, k, fraction, seed=0) == ids).all()


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| row")]
    return {
        cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)
    }


def test_bench_lm_quick_runs_and_losses_agree():
    seq_len, k = 48, 256
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--seq-len", str(seq_len)]
    cmd += ["--peak-tflops", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "peak for MFU: --peak-tflops 1" in out
    assert f"T={seq_len}" in out and f"K={k}" in out
    table = _table(out)
    assert list(table) == ["plain HF", "shipped full", "shipped split"]
    loss = {name: float(cells[-1]) for name, cells in table.items()}
    assert loss["shipped full"] == pytest.approx(loss["plain HF"], rel=1e-4)
    assert "-> agree" in out
    # split normalises each target over a subset of the rows: a strictly smaller softmax sum
    assert loss["shipped split"] < loss["shipped full"]

    # the split head's share: text targets over 50259 rows, image targets over K of the 50560
    n_image = round(0.75 * (seq_len - 1))
    share = (
        ((seq_len - 1 - n_image) * 50259 + n_image * k) / (seq_len - 1) / round_up(50259 + k, 64)
    )
    assert f"the split head does {100 * share:.0f}% of its FLOPs" in out

    config = GPT2Config(vocab_size=round_up(50259 + k, 64), **LM_PRESETS["tiny"])
    flops = flops_per_token(config, seq_len)
    for name in ("shipped full", "shipped split"):
        tokens_per_s = float(table[name][5].replace(",", ""))
        mfu = float(table[name][7].rstrip("%")) / 100
        assert tokens_per_s > 0
        assert mfu == pytest.approx(tokens_per_s * flops / 1e12, rel=0.02, abs=1e-4)


def test_shapes_ceiling_script_tables_every_size_and_shape(tiny_tokenizer_run, tmp_path):
    from vqgpt.shapes import ShapesConfig, shapes_dataset, write_image_folder

    folder = write_image_folder(
        shapes_dataset(ShapesConfig(num_images=1, num_test_images=40, image_size=32), "test"),
        tmp_path / "test",
    )
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "shapes_ceiling.py"),
            "--tokenizer",
            str(tiny_tokenizer_run),
            "--data",
            str(folder),
            "--num-images",
            "40",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        check=True,
        timeout=300,
    ).stdout
    assert "all objects right: originals 100.0%" in out and "(40 images)" in out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| small") or line.startswith("| large")
    ]
    assert rows and sum(int(r.split("|")[3].split("/")[1].split()[0]) for r in rows) >= 40
