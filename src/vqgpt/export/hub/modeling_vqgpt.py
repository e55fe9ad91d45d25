"""The vqgpt image tokenizer for inference: pixels -> codes -> pixels, loadable without vqgpt.

Self-contained remote code (imports only torch and transformers), and the one implementation of
what it holds: vqgpt's own VQ-VAE (`vqgpt.tokenizer.vqvae`) imports the blocks, the encoder and
decoder from this file, and vqgpt's training quantizers the search and lookup of every quantizer
family from `quantization_vqgpt.py` (shipped beside it), so codes and reconstructions are
vqgpt's bit for bit, and parameter names match, so vqgpt's `model.safetensors` loads unchanged.
Training machinery (losses, estimators, EMA, k-means init, dead-code restarts, the LFQ entropy
penalty) stays in vqgpt: its buffers in the checkpoint are ignored on load.

    z_e = encoder(pixels)                                   # (B, D, h, w)
    codes = quantizer.search(z_e)                           # (B, h, w) ids in [0, K), or (B, h, w, L)
    pixels = clamp(decoder(quantizer.lookup(codes)), -1, 1)

with the quantizer family of config.json's `quantizer.type` (vq, simvq, fsq, lfq; the math is in
quantization_vqgpt.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_vqgpt import VQVAEConfig, downsample_factor
from .quantization_vqgpt import build_quantizer

# ---------------------------------------------------------------------------------------------
# convolutional blocks (taming-transformers style)


class LayerNorm2d(nn.Module):
    """Each position's channels normalised on their own ([B, C, H, W]; ConvNeXt's channels-first
    LayerNorm), with GroupNorm's per-channel affine: no statistic over the image reaches a
    position, unlike GroupNorm's. The local encoder's norm (`arch["local_encoder"]`)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def group_norm(channels: int, groups: int, local: bool = False) -> nn.Module:
    """GroupNorm with as many groups as divide `channels` (at most `groups`); `local`: a
    `LayerNorm2d` instead (per position)."""
    if local:
        return LayerNorm2d(channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def output_norm(channels: int, arch: dict, local: bool = False) -> list[nn.Module]:
    """The GroupNorm before the encoder's last conv and the decoder's output conv (taming's
    `norm_out`): [the norm], or [] when `arch["norm_out"]` is false."""
    return [group_norm(channels, arch["norm_groups"], local)] if arch["norm_out"] else []


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected) skip. `kernel` 1: the convs mix no
    neighbouring positions; `local_norm`: per-position norms (`LayerNorm2d`), not GroupNorm."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        groups: int,
        dropout: float = 0.0,
        kernel: int = 3,
        local_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, local_norm)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
        self.norm2 = group_norm(out_ch, groups, local_norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel, padding=kernel // 2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        # (B, C, h, w) -> (B, 1, h*w, C)
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, optional attention, ResnetBlock."""

    def __init__(self, ch: int, groups: int, attention: bool, dropout: float, local: bool = False):
        super().__init__()
        k = 1 if local else 3
        self.res1 = ResnetBlock(ch, ch, groups, dropout, kernel=k, local_norm=local)
        self.attn = AttnBlock(ch, groups) if attention else nn.Identity()
        self.res2 = ResnetBlock(ch, ch, groups, dropout, kernel=k, local_norm=local)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


# ---------------------------------------------------------------------------------------------
# encoder and decoder


class Encoder(nn.Module):
    """pixels [B, 3, H, W] -> z_e [B, latent_dim, H/f, W/f]; `arch` is config.json's
    `architecture` section.

    taming's encoder (the default) sees far: 3x3 convolutions at every level and GroupNorm over
    the whole image, so one code of an 8x8 grid (f = 8) depends on pixels ~9 cells away and on
    the image's statistics. `arch["local_encoder"]` makes it local: norms per position
    (`LayerNorm2d`), and from the level at stride f/2 on (its blocks, the mid block, the last
    conv) 1x1 convolutions, the downsampling convs kept (3x3): a code then sees its own f x f
    patch and about one cell around it (with a stride-2 stem: 24 x 24 pixels at f = 8, 56 x 56
    at f = 16; tests/tokenizer/test_vqvae.py). Why: on flat backgrounds the default gives the
    same content different codes, image by image, which an LM must then predict. The local
    codes' LMs predict them far better and draw no better, worse with the noisy context (vqgpt's
    docs/results.md, issue 15's fourteenth round), so it is off by default.
    """

    def __init__(self, arch: dict):
        super().__init__()
        chans = [arch["base_channels"] * m for m in arch["channel_mult"]]
        groups, dropout = arch["norm_groups"], arch["dropout"]
        local = arch["local_encoder"]
        stem = (
            nn.Conv2d(arch["in_channels"], chans[0], 4, stride=2, padding=1)
            if arch["stem_stride"] == 2
            else nn.Conv2d(arch["in_channels"], chans[0], 3, padding=1)
        )
        layers: list[nn.Module] = [stem]
        ch, stride, f = chans[0], arch["stem_stride"], downsample_factor(arch)
        for level, out_ch in enumerate(chans):
            k = 1 if local and 2 * stride >= f else 3  # local: 1x1 at strides f/2 and f
            for _ in range(arch["num_res_blocks"]):
                layers.append(ResnetBlock(ch, out_ch, groups, dropout, k, local_norm=local))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(Downsample(ch))
                stride *= 2
        k = 1 if local else 3
        layers += [
            MidBlock(ch, groups, arch["attention"], dropout, local),
            *output_norm(ch, arch, local),
            nn.SiLU(),
            nn.Conv2d(ch, arch["latent_dim"], k, padding=k // 2),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.layers(pixels)


class Decoder(nn.Module):
    """z_q [B, latent_dim, h, w] -> pixels [B, 3, h*f, w*f] (unbounded; images live in [-1, 1])."""

    def __init__(self, arch: dict):
        super().__init__()
        chans = [arch["base_channels"] * m for m in arch["channel_mult"]]
        groups, dropout = arch["norm_groups"], arch["dropout"]
        ch = chans[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(arch["latent_dim"], ch, 3, padding=1),
            MidBlock(ch, groups, arch["attention"], dropout),
        ]
        for level in reversed(range(len(chans))):
            for _ in range(arch["num_res_blocks"]):
                layers.append(ResnetBlock(ch, chans[level], groups, dropout))
                ch = chans[level]
            if level > 0:
                layers.append(Upsample(ch))
        if arch["stem_stride"] == 2:
            layers.append(Upsample(ch))
        layers += [*output_norm(ch, arch), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, arch["in_channels"], 3, padding=1)

    def forward(self, z_q: Tensor) -> Tensor:
        return self.conv_out(self.layers(z_q))


def check_pixels(pixels: Tensor, arch: dict) -> None:
    """Raise ValueError unless `pixels` is [B, in_channels, H, W] with sides the encoder divides."""
    channels, f = arch["in_channels"], downsample_factor(arch)
    if pixels.ndim != 4 or pixels.shape[1] != channels:
        raise ValueError(f"pixels must be [B, {channels}, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[-1] % f or pixels.shape[-2] % f:
        raise ValueError(f"image sides {tuple(pixels.shape[-2:])} must be multiples of {f}")


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class VQVAEOutput(ModelOutput):
    """`forward`'s result: the codes and their decoded pixels."""

    reconstruction: Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    codes: Tensor | None = None  # (B, h, w) or (B, h, w, L)


class VQVAEBase(PreTrainedModel):
    """What every vqgpt image tokenizer model shares (this inference one, and vqgpt's training
    one, which subclasses it): the config, the token grid, the codebook size."""

    config_class = VQVAEConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vqvae"

    def _init_weights(self, module: nn.Module) -> None:
        # every module initialises itself (PyTorch defaults, the quantizer's own codebook init):
        # the transformers default would overwrite the codebook
        return

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of one `image_size` image."""
        return self.config.grid

    @property
    def codebook_size(self) -> int:
        """K, the number of codes per level."""
        return self.config.codebook_size


class VQVAE(VQVAEBase):
    """Encoder -> VectorQuantizer -> Decoder: `encode` gives codes, `decode` gives pixels."""

    # training state saved by vqgpt beside the codes; inference does not read it
    _keys_to_ignore_on_load_unexpected = [
        r"ema_cluster_size",
        r"ema_embed_sum",
        r"unused_steps",
        r"\.initialized$",
    ]

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        arch = config.architecture
        self.encoder = Encoder(arch)
        self.quantizer = build_quantizer(arch["latent_dim"], config.quantizer)
        self.decoder = Decoder(arch)
        self.post_init()

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (or [B, h, w, L] for residual VQ)."""
        check_pixels(pixel_values, self.config.architecture)
        return self.quantizer.search(self.encoder(pixel_values))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] (or [B, h, w, L]) -> pixels [B, 3, H, W], clamped to [-1, 1]."""
        codes = torch.as_tensor(codes, device=self.device)
        vectors = self.quantizer.lookup(codes).to(self.decoder.conv_out.weight.dtype)
        return self.decoder(vectors).clamp(-1.0, 1.0)

    def forward(self, pixel_values: Tensor) -> VQVAEOutput:
        """Round trip: the codes of `pixel_values` and their decoded pixels."""
        codes = self.encode(pixel_values)
        return VQVAEOutput(reconstruction=self.decode(codes), codes=codes)
