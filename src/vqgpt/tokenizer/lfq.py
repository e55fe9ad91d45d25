"""LFQ: lookup-free quantization, sign codes with an entropy penalty (`quantizer.type: lfq`).

Yu et al., "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation" (MAGVIT-v2,
ICLR 2024), eqs. 3 and 5; reference implementation lucidrains/vector-quantize-pytorch
`lookup_free_quantization.py`. Each of the d code dims is its sign, q_j = +1 if z_j > 0 else -1;
K = 2^d and the id is sum_j [z_j > 0] 2^j, so ids <-> codes is a bijection on [0, K). The
gradient crosses the sign straight through. The loss is

    beta * ||z - sg[q]||^2  +  entropy_weight * (E_n[H(p_n)] - H(E_n[p_n]))

with p_n(c) = softmax_c(-||z_n - c||^2 / T) over the K codes (T = entropy_temperature): the
per-sample entropy makes each assignment confident, minus the entropy of the batch's mean
distribution rewards using every code. That batch entropy is the MAGVIT authors' (google-research/
magvit `videogvt/train_lib/losses.py`, `entropy_loss`): -sum_c m(c) log(m(c) + 1e-5), m = E_n[p_n].
The 1e-5 bounds the pull towards codes the batch leaves unused (d/dm = -log(m + eps) - m / (m +
eps) <= 11.5 instead of growing without bound as m -> 0; vector-quantize-pytorch clamps m at
1e-5 to the same end); with the exact entropy, vqgpt's LFQ ended 1.6-2.5 dB behind the peer's on
shapes (docs/results.md, issue 15 fifth round). The mean runs over the global batch: under several
processes the [K] sum of p_n is all-reduced with autograd (`torch.distributed.nn`), which with
data parallel's gradient mean gives the one-process gradient. The [N, K] table of p is never
held whole: `chunk_size` rows at a time, each chunk recomputed in the backward pass
(activation checkpointing), so peak memory is O(chunk_size * K). The entropy is a training
loss only (0 in eval mode). The code dim (`codebook_dim`, else latent_dim) must be log2 K.

Inference (digits, ids, lookup) is the export's `ScalarQuantizer`; this adds the training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vqgpt.config import to_dict
from vqgpt.export.hub.quantization_vqgpt import (
    ScalarQuantizer,
    digits_to_ids,
    project,
    search_space,
)
from vqgpt.tokenizer.entropy import entropy_penalty
from vqgpt.tokenizer.estimators import straight_through
from vqgpt.tokenizer.quantize import QuantizerConfig, QuantizerOutput, unsnapped


class LFQ(ScalarQuantizer):
    """LFQ over `dim` latent channels; `forward(z_e [B, D, H, W]) -> QuantizerOutput`.

    Raises:
        ValueError: 2^(code dim) is not codebook_size.
    """

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__(dim, to_dict(cfg), "lfq")
        self.cfg = cfg

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize `z_e` [B, D, H, W]; in training also the entropy penalty."""
        if z_e.ndim != 4 or z_e.shape[1] != self.dim:
            raise ValueError(
                f"LFQ expects z_e of shape [B, {self.dim}, H, W]; got {tuple(z_e.shape)}"
            )
        b, _, h, w = z_e.shape
        cfg = self.cfg
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = search_space(z_e, self.proj_in, False)  # (N, d)
            digits = self.digits(z)  # (N, d), the export's digits
            q = self.values(digits)  # (N, d) in {-1, +1}
            commitment = F.mse_loss(z, q)
            entropy = z.new_zeros(())
            if self.training:
                codebook = self.vectors_of(torch.arange(self.codebook_size, device=z.device))
                entropy = entropy_penalty(z, codebook, cfg.entropy_temperature, cfg.chunk_size)
            z_q = straight_through(z, q)
            out = rearrange(project(z_q, self.proj_out), "(b h w) d -> b d h w", b=b, h=h, w=w)
            codes = rearrange(digits_to_ids(digits, self.levels), "(b h w) -> b h w", b=b, h=h, w=w)
            zero = z.new_zeros(())
            loss = cfg.beta * commitment + cfg.entropy_weight * entropy
        return QuantizerOutput(out.to(z_e.dtype), codes, loss, commitment, zero, entropy)

    def bypass(self, z_e: Tensor) -> Tensor:
        """The warm-up's decoder input: forward without the sign (z through the projections), so
        that they train before the first code is drawn; `z_e` itself without projections."""
        return unsnapped(z_e, self.proj_in, self.proj_out)
