"""Two CPU processes (gloo) with different data end with identical quantizer state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "dist_scripts" / "quantize_sync.py"
SYNCED = ["plain", "ddp", "ddp_nobuf", "ddp_grad"]


@pytest.mark.slow
def test_ranks_with_different_data_keep_identical_codebooks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for mode in SYNCED:
        assert r0["restarts"][mode] > 0, f"{mode}: no dead code was restarted; the test is void"
        assert r0[mode].keys() == r1[mode].keys()
        for name, value in r0[mode].items():
            assert torch.equal(value, r1[mode][name]), f"{mode}: {name} differs across ranks"
        assert r0[mode]["codebooks.0.initialized"]
    # without the sync the same run drifts apart, so the check above has teeth
    assert not torch.equal(r0["control"]["codebooks.0.embed"], r1["control"]["codebooks.0.embed"])
