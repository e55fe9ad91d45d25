"""The quantizer family of a config: `quantizer.type` -> its training module.

vq (`quantize.VectorQuantizer`), simvq (`simvq.SimVQ`), fsq (`fsq.FSQ`), lfq (`lfq.LFQ`): each
takes z_e [B, D, H, W] and returns a `QuantizerOutput` (ids in [0, K)), has `lookup(codes)`,
and loads into the export's inference quantizer of the same type
(`vqgpt.export.hub.quantization_vqgpt.build_quantizer`). The VQ-VAE, training loop, metrics and
stage two see only that: construction is the one place a family is named.
"""

from __future__ import annotations

from torch import nn

from vqgpt.tokenizer.fsq import FSQ
from vqgpt.tokenizer.lfq import LFQ
from vqgpt.tokenizer.quantize import QuantizerConfig, VectorQuantizer
from vqgpt.tokenizer.simvq import SimVQ

FAMILIES: dict[str, type[nn.Module]] = {
    "vq": VectorQuantizer,
    "simvq": SimVQ,
    "fsq": FSQ,
    "lfq": LFQ,
}


def build_quantizer(dim: int, cfg: QuantizerConfig) -> nn.Module:
    """The training quantizer of `cfg.type` over `dim` latent channels (model.latent_dim).

    Raises:
        ConfigError: the code dim does not fit the family (QuantizerConfig.check_code_dim).
    """
    cfg.check_code_dim(dim)
    return FAMILIES[cfg.type](dim, cfg)


__all__ = ["FAMILIES", "build_quantizer"]
