"""The VQ-VAE image tokenizer: its config and VQVAE (a transformers PreTrainedModel).

The encoder, the decoder and their blocks are those an export ships (`vqgpt.export.hub`, one
implementation for both); this module adds the validated config and the training quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqgpt.artifacts import IMAGE_TOKENIZER, check_loading_info, check_shapes, loading
from vqgpt.config import ConfigError, from_dict, to_dict
from vqgpt.export.hub import configuration_vqgpt as hub_config
from vqgpt.export.hub.modeling_vqgpt import Decoder, Encoder, VQVAEBase, check_pixels
from vqgpt.tokenizer.families import build_quantizer
from vqgpt.tokenizer.quantize import QuantizerConfig, QuantizerOutput


@dataclass
class ModelConfig:
    """Encoder / decoder architecture; the downsampling factor is
    stem_stride * 2^(len(channel_mult) - 1)."""

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 1  # per level
    stem_stride: int = 2  # 2: the first conv halves the resolution (cheap on the CPU)
    latent_dim: int = 64  # channels of z_e, the quantizer's input
    attention: bool = False  # self-attention in the mid block (lowest resolution)
    norm_groups: int = 32
    # GroupNorm before the encoder's last conv (to z_e) and the decoder's output conv, as
    # taming-transformers' `norm_out`. false drops both, so each image's per-group mean and scale
    # reach the latent and the pixels (docs/results.md, issue 15's eleventh round: +1.6 dB held
    # out for the photos autoencoder at equal steps and time)
    norm_out: bool = True
    # true: each code sees its own f x f patch and about one cell around it (per-position norms,
    # 1x1 convs from stride f/2 on; modeling_vqgpt.Encoder), not the whole image, so the same
    # content gets the same code in every image. Measured on the demo (docs/results.md, issue
    # 15's fourteenth round): +1.0 dB, LM image loss 0.333 -> 0.112 nats a code, captions 99.5%,
    # but one-draw text-to-image (CFG 1.5) 98.5% -> 80.5% with the noisy context the recipes
    # use (85.5% vs 84.0% without it): off in every recipe
    local_encoder: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.stem_stride not in (1, 2):
            raise ConfigError("model.stem_stride must be 1 or 2")
        if self.local_encoder and self.attention:
            raise ConfigError(
                "model.local_encoder and model.attention exclude each other: the mid block's "
                "self-attention lets every code see the whole image"
            )
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
        """Pixels per token side."""
        return hub_config.downsample_factor(to_dict(self))

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of one image."""
        return hub_config.token_grid(to_dict(self))


class VQVAEConfig(hub_config.VQVAEConfig):
    """`config.json` of a VQVAE: the architecture and quantizer sections, every field validated
    on load (the export's config class reads the same file)."""

    def __init__(
        self,
        architecture: dict[str, Any] | None = None,
        quantizer: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            architecture=to_dict(from_dict(ModelConfig, dict(architecture or {}), "model")),
            # a config.json of vqgpt 0.1 has old key names: read as today's, silently
            quantizer=to_dict(
                from_dict(
                    QuantizerConfig, hub_config.upgrade_quantizer_keys(quantizer or {}), "quantizer"
                )
            ),
            **kwargs,
        )
        self.quant.check_code_dim(self.architecture["latent_dim"])

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


class VQVAE(VQVAEBase):
    """Encoder -> quantizer (the family of `quantizer.type`) -> Decoder; `encode` gives codes,
    `decode` gives pixels; in training, the quantizer's estimator output, losses and updates."""

    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        self.encoder = Encoder(config.architecture)
        # the quantizer draws from a fork of the CPU generator: a seeded encoder and decoder start
        # from the same weights whatever the quantizer (its family, K, its own random draws), so
        # runs that differ only in the quantizer (scripts/bench_tokenizers.py) are paired
        with torch.random.fork_rng(devices=[]):
            self.quantizer = build_quantizer(config.arch.latent_dim, config.quant)
        self.decoder = Decoder(config.architecture)
        self.post_init()

    @classmethod
    def load(cls, folder: str | Path) -> VQVAE:
        """The VQ-VAE of an image tokenizer folder, every file checked first
        (`vqgpt.artifacts.IMAGE_TOKENIZER`); raises ModelFolderError or DamagedFileError."""
        folder = IMAGE_TOKENIZER.check(folder)
        cls.check_weights(folder)
        with loading(folder, IMAGE_TOKENIZER):
            model, info = cls.from_pretrained(folder, output_loading_info=True)
        check_loading_info(folder, IMAGE_TOKENIZER, info)
        return model

    @classmethod
    def check_weights(cls, folder: Path) -> None:
        """config.json of a checked image tokenizer folder fits its model.safetensors: the model
        it describes, built on the meta device (no memory, no init), has exactly the tensors and
        shapes of the weights; else a DamagedFileError naming both files and the first
        disagreement."""
        with loading(folder, IMAGE_TOKENIZER):
            config = cls.config_class.from_pretrained(folder)
            with torch.device("meta"):
                model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_shapes(folder, IMAGE_TOKENIZER, expected)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (for the adaptive adversarial weight)."""
        return self.decoder.conv_out.weight

    def quantize(self, pixels: torch.Tensor) -> QuantizerOutput:
        """pixels [B, 3, H, W] in [-1, 1] -> the quantizer's output for z_e."""
        check_pixels(pixels, self.config.architecture)
        return self.quantizer(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (or [B, h, w, L] for residual VQ)."""
        return self.quantize(pixels).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (or [B, h, w, L]) -> pixels [B, 3, H, W], clamped to [-1, 1]."""
        vectors = self.quantizer.lookup(codes).to(self.decoder.conv_out.weight.dtype)
        return self.decoder(vectors).clamp(-1.0, 1.0)

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """What the decoder reads for each id: [K, D] float32, row k for code k (K = codebook
        size, D = latent_dim), from any family's `lookup`. Raises ValueError for residual VQ
        (num_quantizers > 1), whose ids name one level's code, not a decoder input."""
        quant = self.config.quant
        if quant.num_quantizers > 1:
            raise ValueError(
                f"code_vectors: a residual quantizer ({quant.num_quantizers} levels) has no one "
                "vector per id"
            )
        device = next(self.parameters()).device
        ids = torch.arange(quant.codebook_size, device=device).view(1, -1, 1)  # [B=1, h=K, w=1]
        return self.quantizer.lookup(ids)[0, :, :, 0].T.float()  # (K, D)

    def unused_in_bypass(self) -> list[torch.nn.Parameter]:
        """The trainable quantizer parameters the bypass warm-up does not use (a codebook,
        SimVQ's map): every one but those of the quantizer's `proj_in` / `proj_out` projections
        (None where it has none), which the bypass runs and so trains. The training loop drops
        their zero gradients in bypass steps, leaving them untouched."""
        quantizer = self.quantizer
        used = [quantizer.proj_in, quantizer.proj_out]
        used_ids = {id(p) for m in used if m is not None for p in m.parameters()}
        return [p for p in quantizer.parameters() if p.requires_grad and id(p) not in used_ids]

    def forward(self, pixel_values: torch.Tensor, bypass_quantizer: bool = False) -> VQVAEOutput:
        """Reconstruct; `bypass_quantizer` decodes the quantizer's path without the snapping (the
        autoencoder warm-up): z_e itself for plain codes, through the projections (and l2
        normalisation) for factorised ones, so those train before the first code is drawn."""
        if not bypass_quantizer:
            q = self.quantize(pixel_values)
            return VQVAEOutput(reconstruction=self.decoder(q.quantized), codes=q.codes, quantizer=q)
        check_pixels(pixel_values, self.config.architecture)
        z_e = self.encoder(pixel_values)
        zero = z_e.new_zeros((), dtype=torch.float32)
        touched = zero
        if self.training:  # every trainable quantizer parameter the bypass leaves out enters
            # the loss with weight 0: data parallel then reduces each one as on any other step
            for p in self.unused_in_bypass():
                touched = touched + 0.0 * p.float().sum()
        z = self.quantizer.bypass(z_e)  # every family's forward without the snapping
        q = QuantizerOutput(z, z_e.new_zeros((0,), dtype=torch.long), touched, zero, zero, zero)
        return VQVAEOutput(reconstruction=self.decoder(z), codes=q.codes, quantizer=q)
