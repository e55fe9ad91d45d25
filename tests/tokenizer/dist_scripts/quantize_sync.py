"""Two-process check: ranks see different data; their EMA/k-means/restart codebooks must agree.

Run by tests/test_quantize_dist.py as `torchrun --nproc_per_node 2 quantize_sync.py OUT_DIR`.
Each rank writes OUT_DIR/rank<r>.pt: {mode: {state_name: tensor}, "restarts": {mode: int}}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import vqgpt.tokenizer.quantize as quantize
from vqgpt.config import from_dict
from vqgpt.distributed import leave_process_group
from vqgpt.tokenizer.quantize import QuantizerConfig, VectorQuantizer

STEPS = 6

# mode -> (quantizer overrides, how to wrap: None | broadcast_buffers flag)
MODES = {
    "plain": ({}, None),  # no DDP at all, and a different init on every rank
    "ddp": ({}, True),
    "ddp_nobuf": ({}, False),
    "ddp_grad": ({"ema": False}, False),  # gradient codebook; k-means / restarts still broadcast
    "control": ({}, None),  # sync switched off: the ranks must drift apart
}


class Tiny(nn.Module):
    """A 1x1-conv encoder in front of the quantizer, so DDP has a parameter to sync."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, kernel_size=1)
        self.quantizer = VectorQuantizer(4, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        out = self.quantizer(z)
        return (out.quantized - z).pow(2).mean() + out.loss


def batch(rank: int, step: int) -> torch.Tensor:
    """Rank-specific data: 4 clusters per rank, far apart across ranks."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    centers = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)) * 4 + 6 * rank
    pick = torch.randint(4, (4 * 4 * 4,), generator=g)
    x = centers[pick] + 0.3 * torch.randn(4 * 4 * 4, 3, generator=g)
    return x.reshape(4, 4, 4, 3).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def count_restarts(counter: dict[str, int], mode: str):
    """Wrap Codebook._restart_dead_ to count the codes it re-seeds."""
    original = quantize.Codebook._restart_dead_

    def spy(self, x, codes, counts):
        before = self.unused_steps.clone()
        original(self, x, codes, counts)
        due = (before + 1).masked_fill(counts > 0, 0) >= self.cfg.restart_after_steps
        counter[mode] += int(due.sum())

    return original, spy


def run(mode: str, rank: int, counter: dict[str, int]) -> dict[str, torch.Tensor]:
    overrides, broadcast_buffers = MODES[mode]
    cfg = from_dict(
        QuantizerConfig,
        dict(
            preset="default", codebook_size=16, restart_after_steps=2, kmeans_iters=3, **overrides
        ),
    )
    torch.manual_seed(100 + rank)  # different inits: only the sync can make them agree
    model = Tiny(cfg)
    wrapped = (
        model if broadcast_buffers is None else DDP(model, broadcast_buffers=broadcast_buffers)
    )
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    original, spy = count_restarts(counter, mode)
    quantize.Codebook._restart_dead_ = spy
    ready = quantize._dist_ready
    if mode == "control":
        quantize._dist_ready = lambda: False
    try:
        for step in range(STEPS):
            loss = wrapped(batch(rank, step))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        quantize.Codebook._restart_dead_ = original
        quantize._dist_ready = ready
    return {k: v.detach().clone() for k, v in model.quantizer.state_dict().items()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counter = dict.fromkeys(MODES, 0)
    result = {mode: run(mode, rank, counter) for mode in MODES}
    result["restarts"] = counter
    torch.save(result, out_dir / f"rank{rank}.pt")
    leave_process_group()  # barrier + os._exit: no gloo teardown (see its docstring)


if __name__ == "__main__":
    main()
