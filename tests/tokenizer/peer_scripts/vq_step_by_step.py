"""vqgpt's EMA VQ with the peer's dead-code rule against vector-quantize-pytorch's VectorQuantize,
both as the bench's vq-ste rows build them, on the same inputs and random draws: prints one JSON line per step (codes equal, max |codebook
difference|, both losses). argv: the peer's site folder, dead_code_sampling ("uniform": the
peer's rule; "error": vqgpt's default draws, which must differ)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, sys.argv[1])  # the peer
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import bench_tokenizers  # noqa: E402

from vqgpt.config import apply_overrides, from_dict  # noqa: E402
from vqgpt.tokenizer.quantize import QuantizerConfig, VectorQuantizer  # noqa: E402

DIM, K, STEPS = 16, 128, 12
torch.manual_seed(0)
centers = 2 * torch.randn(40, DIM)  # fewer clusters than codes: k-means leaves codes dead


def batch(step: int) -> torch.Tensor:
    """[8, DIM, 4, 4]: 128 vectors around the centers, drifting a little each step."""
    g = torch.Generator().manual_seed(step)
    x = centers[torch.randint(0, 40, (128,), generator=g)] + 0.3 * torch.randn(
        128, DIM, generator=g
    )
    return (x + 0.05 * step).reshape(8, 4, 4, DIM).permute(0, 3, 1, 2).contiguous()


# the bench's vq-ste rows: vqgpt's section with the peer's rule over it, and the peer's module
rule = ["quantizer.dead_code_threshold=2", f"quantizer.dead_code_sampling={sys.argv[2]}",
        "quantizer.restart_after_steps=0"]  # fmt: skip
wrapped = {"quantizer": bench_tokenizers.quantizer_section("vq-ste", K, bypass_steps=0)}
apply_overrides(wrapped, rule)
ours = VectorQuantizer(DIM, from_dict(QuantizerConfig, wrapped["quantizer"])).train()
peer = bench_tokenizers.peer_module("vq-ste", DIM, K).train()
for step in range(STEPS):
    x = batch(step)
    torch.manual_seed(100 + step)
    a = ours(x.clone().requires_grad_())
    torch.manual_seed(100 + step)
    b = peer(x.clone().requires_grad_())
    diff = (ours.codebooks[0].embed - peer._codebook.embed[0]).abs().max().item()
    print(json.dumps(dict(step=step, codes_equal=bool((a.codes == b[1]).all()), codebook_diff=diff,
                          loss=a.loss.item(), peer_loss=b[2].item())))  # fmt: skip
