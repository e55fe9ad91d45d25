"""vqgpt.cpu_memory: freed big blocks stay in the heap (no page faults when a step reallocates)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import vqgpt.training as training
from vqgpt.training import TrainConfig, build_accelerator

# Five training steps of the LM's loss over a GPT-2-sized vocabulary (the head's gradient alone is
# 51 MiB, 12,600 pages of 4 KiB), after two untimed ones: the minor page faults they cost.
SCRIPT = """
import resource, sys, torch
from vqgpt.cpu_memory import keep_freed_memory
from vqgpt.lm.loss import lm_loss
torch.set_num_threads(1)
if sys.argv[1] == "on":
    assert keep_freed_memory()
g = torch.Generator().manual_seed(0)
V, K, C = 50258, 1024, 256
w = torch.nn.Parameter(torch.randn(V + K, C, generator=g) * 0.02)
labels = torch.randint(0, V + K, (4, 64), generator=g)
def step():
    h = torch.randn(4, 64, C, requires_grad=True, generator=g)
    lm_loss(h, w, labels, None, "split", V, K).loss.backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc's",
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@glibc
def test_freed_blocks_are_reused_without_page_faults():
    off, on = _faults("off"), _faults("on")
    assert off > 5 * 12_600  # each step faults its big tensors in again (measured: ~62,000)
    assert on * 5 < off, (on, off)  # they come back from the heap (measured: ~2,600 a step)


def test_cpu_runs_apply_it_unless_turned_off(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(1) or True)
    build_accelerator(TrainConfig(output_dir="unused", num_threads=1))
    assert calls == [1]
    build_accelerator(TrainConfig(output_dir="unused", num_threads=1, keep_freed_memory=False))
    assert calls == [1]
