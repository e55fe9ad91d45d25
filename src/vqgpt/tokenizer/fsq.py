"""FSQ: finite scalar quantization, no codebook (`quantizer.type: fsq`).

Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple" (ICLR 2024), Appendix A.1;
reference implementation lucidrains/vector-quantize-pytorch `finite_scalar_quantization.py`.
Each of the d = len(levels) code dims is bounded, `b_j = tanh(z_j + s_j) h_j - o_j` (h_j =
(L_j - 1)(1 + 1e-3) / 2, o_j = 1/2 for even L_j else 0, s_j = atanh(o_j / h_j)), and rounded:
the digit is `round(b_j) + L_j // 2` in [0, L_j), the code value `round(b_j) / (L_j // 2)` in
[-1, 1]. K = prod(levels); the id is the mixed-radix number of the digits (dim 0 least
significant), so ids <-> codes is a bijection on [0, K). The gradient crosses the rounding
straight through (d value / d b = 1 / (L // 2)). No auxiliary loss, nothing to update, nothing
to sync: every code exists by construction. The code dim (`codebook_dim`, else the encoder's
latent_dim) must be len(levels).

Inference (digits, ids, lookup) is the export's `ScalarQuantizer`; this adds the training forward.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from vqgpt.config import to_dict
from vqgpt.export.hub.quantization_vqgpt import (
    ScalarQuantizer,
    digits_to_ids,
    fsq_bound,
    project,
    search_space,
)
from vqgpt.tokenizer.estimators import straight_through
from vqgpt.tokenizer.quantize import QuantizerConfig, QuantizerOutput, unsnapped


class FSQ(ScalarQuantizer):
    """FSQ over `dim` latent channels; `forward(z_e [B, D, H, W]) -> QuantizerOutput`.

    Raises:
        ValueError: the code dim is not len(levels) or prod(levels) is not codebook_size.
    """

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__(dim, to_dict(cfg), "fsq")
        self.cfg = cfg

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize `z_e` [B, D, H, W]; losses are 0 (FSQ has none)."""
        if z_e.ndim != 4 or z_e.shape[1] != self.dim:
            raise ValueError(
                f"FSQ expects z_e of shape [B, {self.dim}, H, W]; got {tuple(z_e.shape)}"
            )
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = search_space(z_e, self.proj_in, False)  # (N, d)
            digits = self.digits(z)  # (N, d), the export's digits
            half = torch.tensor([n // 2 for n in self.levels], device=z.device)
            # value: the code of the digits; gradient: through the bound, scaled like the value
            z_q = straight_through(fsq_bound(z, self.levels) / half, self.values(digits))
            out = rearrange(project(z_q, self.proj_out), "(b h w) d -> b d h w", b=b, h=h, w=w)
            codes = rearrange(digits_to_ids(digits, self.levels), "(b h w) -> b h w", b=b, h=h, w=w)
            zero = z.new_zeros(())
        return QuantizerOutput(out.to(z_e.dtype), codes, zero, zero, zero, zero)

    def bypass(self, z_e: Tensor) -> Tensor:
        """The warm-up's decoder input: forward without the rounding (the bounded, scaled z
        through the projections), so that they train before the first code is drawn."""
        half = torch.tensor([n // 2 for n in self.levels], device=z_e.device)
        return unsnapped(
            z_e, self.proj_in, self.proj_out, squash=lambda z: fsq_bound(z, self.levels) / half
        )
