"""Configuration of the vqgpt image tokenizer (a VQ-VAE), as exported to the Hugging Face Hub.

Self-contained remote code: imports only transformers. `config.json` keeps vqgpt's two sections,
`architecture` (encoder / decoder) and `quantizer`; vqgpt's own config class subclasses this one
(adding the validation of every field), so both read the same file the same way. Only the fields
that inference needs are read here; the training-only quantizer options (EMA, k-means, restarts)
ride along untouched.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "in_channels": 3,
    "base_channels": 32,
    "channel_mult": [1, 2, 2],  # one entry per resolution level
    "num_res_blocks": 1,  # per level
    "stem_stride": 2,  # 2: the first conv halves the resolution
    "latent_dim": 64,  # channels of z_e, the quantizer's input
    "attention": False,  # self-attention in the mid blocks
    "norm_groups": 32,
    "norm_out": True,  # GroupNorm before the encoder's last conv and the decoder's output conv
    "local_encoder": False,  # per-position norms, 1x1 convs at the two lowest resolutions
    "dropout": 0.0,
}
QUANTIZER_DEFAULTS: dict[str, Any] = {
    "type": "vq",  # the family: vq | simvq | fsq | lfq (quantization_vqgpt.py)
    "codebook_size": 1024,  # K
    "codebook_dim": None,  # factorised codes: searched in this many dims (proj_in / proj_out)
    "l2_normalize": False,  # codes and inputs on the unit sphere (cosine search)
    "num_quantizers": 1,  # residual quantisation depth (codes per position)
    "chunk_size": 256,  # rows per block of the nearest-code search
    "fsq_levels": None,  # fsq: values per code dim (K = prod(fsq_levels))
}


# keys of vqgpt 0.1 (before the layout issue), read as their new names wherever a config is loaded
RENAMED_QUANTIZER_KEYS: dict[str, str] = {
    "levels": "num_quantizers",  # "levels" also meant the encoder's resolution levels
    "warmup_steps": "bypass_steps",  # "warmup" also meant the LR warm-up (train.warmup_steps)
}


def upgrade_quantizer_keys(quantizer: dict[str, Any]) -> dict[str, Any]:
    """A copy of a `quantizer` section with 0.1's key names mapped to today's."""
    out = dict(quantizer)
    for old, new in RENAMED_QUANTIZER_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def downsample_factor(architecture: dict[str, Any]) -> int:
    """Pixels per token side: stem_stride * 2^(len(channel_mult) - 1)."""
    return architecture["stem_stride"] * 2 ** (len(architecture["channel_mult"]) - 1)


def token_grid(architecture: dict[str, Any]) -> tuple[int, int]:
    """Token grid (h, w) of one `image_size` x `image_size` image."""
    side = architecture["image_size"] // downsample_factor(architecture)
    return (side, side)


class VQVAEConfig(PretrainedConfig):
    """`config.json` of the image tokenizer: `architecture` and `quantizer` sections."""

    model_type = "vqgpt_vqvae"

    def __init__(
        self,
        architecture: dict[str, Any] | None = None,
        quantizer: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.architecture = {**ARCHITECTURE_DEFAULTS, **(architecture or {})}
        self.quantizer = {**QUANTIZER_DEFAULTS, **upgrade_quantizer_keys(quantizer or {})}
        arch, quant = self.architecture, self.quantizer
        if arch["stem_stride"] not in (1, 2):
            raise ValueError(f"architecture.stem_stride must be 1 or 2, got {arch['stem_stride']}")
        if quant["type"] not in ("vq", "simvq", "fsq", "lfq"):
            raise ValueError(f"quantizer.type {quant['type']!r} is unknown")
        if quant["l2_normalize"] and quant["num_quantizers"] > 1:
            raise ValueError("quantizer: l2_normalize with num_quantizers > 1 is not supported")
        super().__init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side."""
        return downsample_factor(self.architecture)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of one `image_size` image."""
        return token_grid(self.architecture)

    @property
    def codebook_size(self) -> int:
        """K, the number of codes per level (prod(levels) for fsq, 2^d for lfq)."""
        return self.quantizer["codebook_size"]
