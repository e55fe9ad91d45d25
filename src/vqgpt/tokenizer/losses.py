"""Stage-one losses: reconstruction, LPIPS perceptual, PatchGAN adversarial, a named loss record.

The combination follows taming-transformers' `VQLPIPSWithDiscriminator`:

    recon = l1_weight * |x - x'| + l2_weight * (x - x')^2 + perceptual_weight * LPIPS(x, x')
    total = recon + quantizer_loss + adversarial_weight * adaptive_weight * (-mean D(x'))

with the adaptive weight balancing the gradients of the two terms at the decoder's last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vqgpt.config import ConfigError

LPIPS_HOWTO = (
    "Make the file once with vqgpt.tokenizer.losses.convert_lpips_weights(vgg16_pth, lpips_vgg_pth, out) "
    "from torchvision's VGG16 weights (vgg16-397923af.pth) and the `lpips` package's "
    "weights/v0.1/vgg.pth; nothing is downloaded at run time."
)

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class LossConfig:
    """Stage-one loss terms and their weights (YAML section `loss`)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0  # LPIPS-VGG16; needs perceptual_weights_path
    perceptual_weights_path: str | None = None  # safetensors file, see convert_lpips_weights
    adversarial_weight: float = 0.0  # 0 = no discriminator at all
    adversarial_start_step: int = 0  # generator term and D training start at this step
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    adaptive_weight: bool = True  # taming's gradient-norm balancing of the generator term

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "adversarial_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"loss.{name} must be a finite number >= 0, got {value!r}")
        if self.l1_weight + self.l2_weight + self.perceptual_weight == 0:
            raise ConfigError(
                "loss.l1_weight, loss.l2_weight and loss.perceptual_weight are all 0: "
                "nothing pulls the reconstruction towards the input; set at least one above 0"
            )
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ConfigError(
                "loss.perceptual_weight > 0 needs loss.perceptual_weights_path "
                f"(a safetensors file with LPIPS-VGG16 weights). {LPIPS_HOWTO}"
            )
        if self.adversarial_start_step < 0:
            raise ConfigError("loss.adversarial_start_step must be >= 0")
        if self.discriminator_channels < 1:
            raise ConfigError("loss.discriminator_channels must be at least 1")
        if self.discriminator_layers < 1:
            raise ConfigError("loss.discriminator_layers must be at least 1")


# ---------------------------------------------------------------------------------------------
# reconstruction and adversarial terms


def l1_loss(pixels: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean absolute pixel error (pixels in [-1, 1])."""
    return (pixels - reconstruction).abs().mean()


def l2_loss(pixels: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean squared pixel error (pixels in [-1, 1])."""
    return (pixels - reconstruction).pow(2).mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss, 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x'))) as in taming."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator term of the hinge GAN: -mean D(x')."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """taming's gradient balance ||d rec / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4].

    With several processes the gradients are averaged over them first (each loss is a mean over
    the process's share of the batch), so the weight is the one of the whole global batch.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([rec_grad, g_grad])
        dist.all_reduce(both)
        rec_grad, g_grad = both / dist.get_world_size()
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of BatchNorm: no cross-replica statistics under DDP, works at batch 1
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """pix2pix / taming NLayerDiscriminator with GroupNorm: one logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        self.layers = layers
        blocks: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1  # the last hidden block keeps the resolution (-1)
            blocks += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                _group_norm(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    @property
    def min_size(self) -> int:
        """Smallest input side giving at least one patch: H // 2**layers - 2 >= 1."""
        return 3 * 2**self.layers

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H // 2**layers - 2, W // 2**layers - 2)."""
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(
                f"the discriminator with {self.layers} layers needs images of at least "
                f"{self.min_size}x{self.min_size}, got {tuple(images.shape[-2:])}; "
                "lower loss.discriminator_layers"
            )
        return self.main(images)


# ---------------------------------------------------------------------------------------------
# LPIPS (VGG16), plain torch

# torchvision's vgg16().features layout: conv indices, and where LPIPS taps relu1_2 ... relu5_3
_VGG_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256))
_VGG_CONVS += ((12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512))
_VGG_CONVS += ((24, 512, 512), (26, 512, 512), (28, 512, 512))
_VGG_POOLS = (4, 9, 16, 23)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # the ReLU after each block's last conv
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# Key layout of the weights file (== LPIPS.state_dict()):
#   features.{i}.weight / features.{i}.bias for i in _VGG_CONVS (torchvision's names and shapes)
#   lins.{j}.weight of shape (1, C_j, 1, 1) for j = 0..4 (lpips' lin{j}.model.1.weight)
LPIPS_KEYS = tuple(f"features.{i}.{p}" for i, _, _ in _VGG_CONVS for p in ("weight", "bias"))
LPIPS_KEYS += tuple(f"lins.{j}.weight" for j in range(len(_LPIPS_CHANNELS)))


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 backbone (Zhang et al. 2018), frozen, weights from a file."""

    # lpips' ScalingLayer: inputs in [-1, 1] are mapped to ImageNet-normalised scale
    shift: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        convs = {i: (cin, cout) for i, cin, cout in _VGG_CONVS}
        for i in range(_LPIPS_TAPS[-1] + 1):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
            elif i in _VGG_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode: the network is a fixed metric."""
        return super().train(False)

    def _taps(self, images: Tensor) -> list[Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-image LPIPS distance (B,) between two (B, 3, H, W) batches in [-1, 1]."""
        taps = self._taps(torch.cat([a, b]))
        dist = a.new_zeros(a.shape[0])
        for feats, lin in zip(taps, self.lins, strict=True):
            fa, fb = feats.chunk(2)
            # unit-normalise over channels, weighted squared difference, spatial mean
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return dist


def load_lpips(path: str | Path | None) -> LPIPS:
    """Build LPIPS-VGG16 from a safetensors file in the `LPIPS_KEYS` layout; errors say how to fix."""
    from safetensors.torch import load_file

    if not path:
        raise FileNotFoundError(
            f"no LPIPS weights file given (loss.perceptual_weights_path). {LPIPS_HOWTO}"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights file {path} (loss.perceptual_weights_path) does not exist. {LPIPS_HOWTO}"
        )
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}). {LPIPS_HOWTO}"
        ) from err
    model = LPIPS()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"LPIPS weights file {path} lacks {len(missing)} expected key(s), e.g. {missing[:3]}; "
            f"it needs {', '.join(LPIPS_KEYS[:2])} ... lins.4.weight. {LPIPS_HOWTO}"
        )
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"LPIPS weights file {path}: {k} has shape {tuple(state[k].shape)}, expected "
            f"{tuple(expected[k].shape)}. {LPIPS_HOWTO}"
        )
    model.load_state_dict({k: state[k].float() for k in expected})
    return model


def convert_lpips_weights(
    vgg16_state_dict_path: str | Path, lpips_vgg_pth_path: str | Path, out_path: str | Path
) -> Path:
    """Write the LPIPS-VGG16 safetensors file from torchvision + lpips checkpoints (both local).

    - `vgg16_state_dict_path`: torchvision's `vgg16-397923af.pth` (the state dict of
      `torchvision.models.vgg16(weights="IMAGENET1K_V1")`; keys `features.{i}.weight/bias`).
    - `lpips_vgg_pth_path`: `lpips/weights/v0.1/vgg.pth` from the `lpips` package (keys
      `lin{j}.model.1.weight`, or `lin{j}.model.0.weight` from versions without dropout).
    Only tensors are read (`torch.load(weights_only=True)`); the classifier is dropped.
    """
    from safetensors.torch import save_file

    vgg = torch.load(vgg16_state_dict_path, map_location="cpu", weights_only=True)
    lin = torch.load(lpips_vgg_pth_path, map_location="cpu", weights_only=True)
    out: dict[str, Tensor] = {}
    for key in LPIPS_KEYS:
        if key.startswith("features."):
            if key not in vgg:
                raise ValueError(
                    f"{vgg16_state_dict_path} lacks {key}: expected torchvision's vgg16 state dict"
                )
            out[key] = vgg[key]
        else:
            j = key.split(".")[1]
            names = [f"lin{j}.model.1.weight", f"lin{j}.model.0.weight"]
            found = [n for n in names if n in lin]
            if not found:
                raise ValueError(
                    f"{lpips_vgg_pth_path} lacks {names[0]}: expected lpips' weights/v0.1/vgg.pth"
                )
            out[key] = lin[found[0]]
    out = {k: v.detach().float().contiguous() for k, v in out.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata={"format": "vqgpt-lpips-vgg16"})
    return out_path


# ---------------------------------------------------------------------------------------------
# the combined loss


@dataclass
class LossRecord:
    """A loss to backpropagate (`total`) and its named, detached parts for logging."""

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)

    def to_log(self, prefix: str = "") -> dict[str, float]:
        """Plain floats keyed `prefix + name`, total included."""
        values = {"total": self.total.detach(), **self.parts}
        return {prefix + k: float(v) for k, v in values.items()}


class VQLoss(nn.Module):
    """Reconstruction + quantizer + optional LPIPS and PatchGAN terms for the VQ-VAE.

    The training loop gives `discriminator` its own optimiser and calls `discriminator_loss`
    only when `uses_discriminator(step)`. The generator step also leaves gradients on the
    discriminator's parameters: zero them before its own backward.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.perceptual = (
            load_lpips(cfg.perceptual_weights_path) if cfg.perceptual_weight > 0 else None
        )
        self.discriminator = (
            PatchDiscriminator(cfg.discriminator_channels, cfg.discriminator_layers)
            if cfg.adversarial_weight > 0
            else None
        )

    def uses_discriminator(self, step: int) -> bool:
        """Whether the adversarial terms are active at `step`."""
        return self.discriminator is not None and step >= self.cfg.adversarial_start_step

    def autoencoder_loss(
        self,
        pixels: Tensor,
        reconstruction: Tensor,
        quantizer_loss: Tensor,
        step: int,
        last_layer: Tensor | None = None,
    ) -> LossRecord:
        """Loss for the VQ-VAE's parameters; `last_layer` is the decoder's output conv weight."""
        cfg = self.cfg
        zero = reconstruction.new_zeros(())
        l1 = l1_loss(pixels, reconstruction)
        l2 = l2_loss(pixels, reconstruction)
        perceptual = (
            self.perceptual(pixels, reconstruction).mean() if self.perceptual is not None else zero
        )
        recon = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.perceptual_weight * perceptual
        total = recon + quantizer_loss
        generator, weight = zero, zero
        if self.uses_discriminator(step):
            assert self.discriminator is not None
            generator = hinge_g_loss(self.discriminator(reconstruction))
            weight = self._adaptive_weight(recon, generator, last_layer)
            total = total + cfg.adversarial_weight * weight * generator
        parts = dict(
            recon=recon,
            l1=l1,
            l2=l2,
            perceptual=perceptual,
            quantizer=quantizer_loss,
            generator=generator,
            adaptive_weight=weight,
        )
        return LossRecord(total, {k: v.detach() for k, v in parts.items()})

    def _adaptive_weight(
        self, recon: Tensor, generator: Tensor, last_layer: Tensor | None
    ) -> Tensor:
        if not self.cfg.adaptive_weight:
            return recon.new_ones(())
        if not (torch.is_grad_enabled() and recon.requires_grad and generator.requires_grad):
            # evaluation without a graph: as in taming, the generator term is left out of `total`
            return recon.new_zeros(())
        if last_layer is None:
            raise ValueError(
                "loss.adaptive_weight is on, so autoencoder_loss needs last_layer (the decoder's "
                "output conv weight); pass it or set loss.adaptive_weight=false"
            )
        return adaptive_weight(recon, generator, last_layer)

    def discriminator_loss(self, pixels: Tensor, reconstruction: Tensor, step: int) -> LossRecord:
        """Hinge loss for the discriminator on real `pixels` vs detached `reconstruction`."""
        if not self.uses_discriminator(step):
            raise RuntimeError(
                f"discriminator_loss called at step {step}, but the discriminator is inactive "
                f"(loss.adversarial_weight={self.cfg.adversarial_weight}, "
                f"loss.adversarial_start_step={self.cfg.adversarial_start_step}); "
                "check uses_discriminator(step) first"
            )
        assert self.discriminator is not None
        # one forward for both (a data-parallel module must see one forward per backward)
        both = self.discriminator(torch.cat([pixels.detach(), reconstruction.detach()]))
        logits_real, logits_fake = both.chunk(2)
        disc = hinge_d_loss(logits_real, logits_fake)
        parts = dict(disc=disc, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        return LossRecord(disc, {k: v.detach() for k, v in parts.items()})


__all__ = [
    "LPIPS",
    "LPIPS_KEYS",
    "LossConfig",
    "LossRecord",
    "PatchDiscriminator",
    "VQLoss",
    "adaptive_weight",
    "convert_lpips_weights",
    "hinge_d_loss",
    "hinge_g_loss",
    "l1_loss",
    "l2_loss",
    "load_lpips",
]
