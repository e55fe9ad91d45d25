"""The VQ-VAE image tokenizer: Encoder, Decoder and VQVAE (a transformers PreTrainedModel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vqgpt.config import ConfigError, from_dict, to_dict
from vqgpt.tokenizer.blocks import Downsample, MidBlock, ResnetBlock, Upsample, group_norm
from vqgpt.tokenizer.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer


@dataclass
class ModelConfig:
    """Encoder / decoder architecture; the downsampling factor is stem_stride * 2^(levels - 1)."""

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 1  # per level
    stem_stride: int = 2  # 2: the first conv halves the resolution (cheap on the CPU)
    latent_dim: int = 64  # channels of z_e, the quantizer's input
    attention: bool = False  # self-attention in the mid block (lowest resolution)
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.stem_stride not in (1, 2):
            raise ConfigError("model.stem_stride must be 1 or 2")
        if not self.channel_mult:
            raise ConfigError("model.channel_mult needs at least one entry")
        f = self.downsample_factor
        if f not in (2, 4, 8, 16, 32):
            raise ConfigError(f"model: downsampling factor {f} must be a power of two in 2..32")
        if self.image_size % f:
            raise ConfigError(
                f"model.image_size {self.image_size} is not divisible by the factor {f}"
            )

    @property
    def downsample_factor(self) -> int:
        return self.stem_stride * 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return (side, side)


class Encoder(nn.Module):
    """pixels [B, 3, H, W] -> z_e [B, latent_dim, H/f, W/f]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        stem = (
            nn.Conv2d(cfg.in_channels, chans[0], 4, stride=2, padding=1)
            if cfg.stem_stride == 2
            else nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        )
        layers: list[nn.Module] = [stem]
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(ch, out_ch, cfg.norm_groups, cfg.dropout))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(Downsample(ch))
        layers += [
            MidBlock(ch, cfg.norm_groups, cfg.attention, cfg.dropout),
            group_norm(ch, cfg.norm_groups),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.latent_dim, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class Decoder(nn.Module):
    """z_q [B, latent_dim, h, w] -> pixels [B, 3, h*f, w*f] (unbounded; images live in [-1, 1])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.latent_dim, ch, 3, padding=1),
            MidBlock(ch, cfg.norm_groups, cfg.attention, cfg.dropout),
        ]
        for level in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(ch, chans[level], cfg.norm_groups, cfg.dropout))
                ch = chans[level]
            if level > 0:
                layers.append(Upsample(ch))
        if cfg.stem_stride == 2:
            layers.append(Upsample(ch))
        layers += [group_norm(ch, cfg.norm_groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.layers(z_q))


class VQVAEConfig(PretrainedConfig):
    """`config.json` of a VQVAE: the architecture and quantizer sections, validated on load."""

    model_type = "vqgpt_vqvae"

    def __init__(
        self,
        architecture: dict[str, Any] | None = None,
        quantizer: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.architecture = to_dict(from_dict(ModelConfig, dict(architecture or {}), "model"))
        self.quantizer = to_dict(from_dict(QuantizerConfig, dict(quantizer or {}), "quantizer"))
        super().__init__(**kwargs)

    @classmethod
    def build(cls, model: ModelConfig, quantizer: QuantizerConfig) -> VQVAEConfig:
        """Config from the recipe's `model` and `quantizer` dataclasses."""
        return cls(architecture=to_dict(model), quantizer=to_dict(quantizer))

    @property
    def arch(self) -> ModelConfig:
        return from_dict(ModelConfig, dict(self.architecture))

    @property
    def quant(self) -> QuantizerConfig:
        return from_dict(QuantizerConfig, dict(self.quantizer))


@dataclass
class VQVAEOutput:
    """What one forward pass gives: the reconstruction and the quantizer's record."""

    reconstruction: torch.Tensor  # (B, 3, H, W)
    codes: torch.Tensor  # (B, h, w) or (B, h, w, L)
    quantizer: QuantizerOutput


class VQVAE(PreTrainedModel):
    """Encoder -> VectorQuantizer -> Decoder; `encode` gives codes, `decode` gives pixels."""

    config_class = VQVAEConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vqvae"

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        arch = config.arch
        self.encoder = Encoder(arch)
        self.quantizer = VectorQuantizer(arch.latent_dim, config.quant)
        self.decoder = Decoder(arch)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every block initialises itself (PyTorch defaults, the quantizer's own codebook init);
        # the transformers default would overwrite the codebook.
        return

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of one image."""
        return self.config.arch.grid

    @property
    def codebook_size(self) -> int:
        return self.config.quant.codebook_size

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (for the adaptive adversarial weight)."""
        return self.decoder.conv_out.weight

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        arch = self.config.arch
        if pixels.ndim != 4 or pixels.shape[1] != arch.in_channels:
            raise ValueError(
                f"pixels must be [B, {arch.in_channels}, H, W], got {tuple(pixels.shape)}"
            )
        f = arch.downsample_factor
        if pixels.shape[-1] % f or pixels.shape[-2] % f:
            raise ValueError(f"image sides {tuple(pixels.shape[-2:])} must be multiples of {f}")

    def quantize(self, pixels: torch.Tensor) -> QuantizerOutput:
        """pixels [B, 3, H, W] in [-1, 1] -> the quantizer's output for z_e."""
        self._check_pixels(pixels)
        return self.quantizer(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (or [B, h, w, L] for residual VQ)."""
        return self.quantize(pixels).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (or [B, h, w, L]) -> pixels [B, 3, H, W], clamped to [-1, 1]."""
        return self.decoder(self.quantizer.lookup(codes)).clamp(-1.0, 1.0)

    def forward(self, pixel_values: torch.Tensor, bypass_quantizer: bool = False) -> VQVAEOutput:
        """Reconstruct; `bypass_quantizer` decodes z_e itself (the autoencoder warm-up)."""
        if not bypass_quantizer:
            q = self.quantize(pixel_values)
            return VQVAEOutput(reconstruction=self.decoder(q.quantized), codes=q.codes, quantizer=q)
        self._check_pixels(pixel_values)
        z_e = self.encoder(pixel_values)
        zero = z_e.new_zeros((), dtype=torch.float32)
        q = QuantizerOutput(
            z_e, z_e.new_zeros((0,), dtype=torch.long), zero, zero, zero, zero, zero
        )
        return VQVAEOutput(reconstruction=self.decoder(z_e), codes=q.codes, quantizer=q)
