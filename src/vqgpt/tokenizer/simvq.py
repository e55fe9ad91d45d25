"""SimVQ: a frozen random codebook behind one learnt linear map (`quantizer.type: simvq`).

Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer" (ICCV 2025); reference implementation lucidrains/vector-quantize-pytorch `sim_vq.py`.
The codes are e = C W^T: C [K, d] is drawn once from N(0, 1/d) and frozen (a saved buffer), W
[d, d] is learnt. The search, losses and estimator are VQ's (docs/design.md, "Quantizer math"),
over e: `k = argmin_i ||z - e_i||^2`, codebook loss `||sg[z] - e_k||^2`, commitment
`beta * ||z - sg[e_k]||^2`, z_q by `estimator` (ste | rotation). The codebook loss reaches W,
and through W every code, used or not: no code is left behind, so there is no EMA, k-means init
or dead-code restart (those fields are unused; FAMILY_FIELDS in quantize.py).

Inference (search, lookup, the parameters and their names) is the export's
`SimVectorQuantizer`; this subclass adds the training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vqgpt.config import to_dict
from vqgpt.export.hub.quantization_vqgpt import SimVectorQuantizer, project, search_space
from vqgpt.tokenizer.estimators import apply_estimator
from vqgpt.tokenizer.quantize import QuantizerConfig, QuantizerOutput, nearest_code, unsnapped


class SimVQ(SimVectorQuantizer):
    """SimVQ over `dim` latent channels; `forward(z_e [B, D, H, W]) -> QuantizerOutput`."""

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__(dim, to_dict(cfg))
        self.cfg = cfg

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize `z_e` [B, D, H, W] (float32 inside); the losses train W and the encoder.

        Raises:
            ValueError: z_e is not [B, dim, H, W].
        """
        if z_e.ndim != 4 or z_e.shape[1] != self.dim:
            raise ValueError(
                f"SimVQ expects z_e of shape [B, {self.dim}, H, W]; got {tuple(z_e.shape)}"
            )
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = search_space(z_e, self.proj_in, False)  # (N, d)
            codebook = self.codebook  # (K, d), a function of W
            codes = nearest_code(z.detach(), codebook.detach(), self.chunk_size)  # (N,)
            q = F.embedding(codes, codebook)  # (N, d)
            commitment = F.mse_loss(z, q.detach())
            codebook_loss = F.mse_loss(q, z.detach())  # the only path to W
            z_q = apply_estimator(self.cfg.estimator, z, q)  # value e_k, a gradient to z
            out = rearrange(project(z_q, self.proj_out), "(b h w) d -> b d h w", b=b, h=h, w=w).to(
                z_e.dtype
            )
            codes = rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)
            loss = codebook_loss + self.cfg.beta * commitment
        return QuantizerOutput(out, codes, loss, commitment, codebook_loss, z.new_zeros(()))

    def bypass(self, z_e: Tensor) -> Tensor:
        """The warm-up's decoder input: forward without the snapping (z through the projections),
        so that they train before the first code is drawn; `z_e` itself without projections."""
        return unsnapped(z_e, self.proj_in, self.proj_out)
