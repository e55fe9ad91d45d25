"""Image reconstruction metrics (PSNR, SSIM) and codebook usage statistics.

Images are (B, 3, H, W) tensors in [-1, 1], the model's pixel range. Both metrics first map them
to [0, 1] and clamp there (what a saved image would hold), so the data range is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE clamped at 1e-10) instead of inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2  # (K1 * data_range)^2, Wang et al. 2004
_SSIM_C2 = 0.03**2  # (K2 * data_range)^2


def _unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] float32, clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) image batches of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB (B,) on the [0, 1] scale; identical images give PSNR_CAP_DB."""
    _check_pair(a, b)
    mse = (_unit(a) - _unit(b)).pow(2).mean(dim=(1, 2, 3))
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(floor))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian taps (size,), as scipy's gaussian_filter with truncate=3.5."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _blur_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian filter without padding: (N, 1, H, W) -> (N, 1, H - k + 1, W - k + 1)."""
    k = taps.numel()
    x = F.conv2d(x, taps.reshape(1, 1, k, 1))  # along H
    return F.conv2d(x, taps.reshape(1, 1, 1, k))  # along W


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM (B,): Gaussian window 11 / sigma 1.5 on [0, 1], 'valid' region, channel mean.

    Matches skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...).
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}"
        )
    batch = a.shape[0]
    x = rearrange(_unit(a).double(), "b c h w -> (b c) 1 h w")
    y = rearrange(_unit(b).double(), "b c h w -> (b c) 1 h w")
    taps = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, a.device).double()
    # one filter pass over the five moment maps: (5 * B * C, 1, H', W')
    moments = _blur_valid(torch.cat([x, y, x * x, y * y, x * y]), taps)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    ssim_map = rearrange(num / den, "(b c) 1 h w -> b (c h w)", b=batch)
    return ssim_map.mean(dim=1).float()


# ---------------------------------------------------------------------------------------------
# reconstruction meter


@dataclass
class ReconstructionScores:
    """Mean PSNR (dB) and SSIM over `count` images."""

    psnr: float
    ssim: float
    count: int


class ReconstructionMeter:
    """Accumulates per-image PSNR and SSIM over batches; `compute` gives the means."""

    def __init__(self) -> None:
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Add a batch of (B, 3, H, W) originals and reconstructions in [-1, 1]."""
        self.psnr_sum += float(psnr(originals, reconstructions).sum())
        self.ssim_sum += float(ssim(originals, reconstructions).sum())
        self.count += originals.shape[0]

    def compute(self) -> ReconstructionScores:
        """Means over every image seen so far."""
        if self.count == 0:
            raise ValueError("ReconstructionMeter.compute() before any update(): no images seen")
        return ReconstructionScores(
            self.psnr_sum / self.count, self.ssim_sum / self.count, self.count
        )


# ---------------------------------------------------------------------------------------------
# codebook usage


@dataclass
class CodebookStats:
    """How a codebook is used: fraction of codes seen, perplexity, counts per code (K,)."""

    usage: float  # codes used at least once / K
    perplexity: float  # exp(entropy) of the code distribution: K when uniform, 1 when collapsed
    histogram: Tensor  # (K,) int64 counts


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """Counts (K,) int64, on the CPU, of every entry of `codes` (any shape) in [0, K)."""
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"codes must lie in [0, {codebook_size}), got values in "
            f"[{int(flat.min())}, {int(flat.max())}]; is codebook_size right?"
        )
    return torch.bincount(flat, minlength=codebook_size).cpu()


def stats_from_histogram(histogram: Tensor) -> CodebookStats:
    """Usage and perplexity of a (K,) count histogram."""
    counts = histogram.double()
    total = counts.sum()
    if total == 0:
        return CodebookStats(0.0, 0.0, histogram)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()  # 0 log 0 = 0
    usage = float((histogram > 0).sum()) / histogram.numel()
    return CodebookStats(usage, math.exp(float(entropy)), histogram)


def codebook_stats(codes: Tensor, codebook_size: int) -> CodebookStats:
    """Stats of every entry of `codes` pooled (any shape); for one residual quantizer pass
    codes[..., q]."""
    return stats_from_histogram(code_histogram(codes, codebook_size))


class CodebookUsage:
    """Accumulates code counts over a whole split, per residual quantizer.

    `update` takes (B, h, w) codes (one quantizer) or (B, h, w, L) for L residual ones;
    `compute()` reports the first (the coarse one, which carries most of the image),
    `compute(q)` any other, `per_quantizer()` all of them. `counts` (L, K) can be summed across
    processes.
    """

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts: Tensor | None = None  # (L, K) int64, created on the first update

    def update(self, codes: Tensor) -> None:
        """Count a batch of codes, (B, h, w) or (B, h, w, L)."""
        if codes.ndim == 3:
            codes = codes.unsqueeze(-1)  # (B, h, w, 1)
        if codes.ndim != 4:
            raise ValueError(f"codes must be (B, h, w) or (B, h, w, L), got {tuple(codes.shape)}")
        per_quantizer = rearrange(codes, "b h w l -> l (b h w)")
        batch = torch.stack([code_histogram(q, self.codebook_size) for q in per_quantizer])
        if self.counts is None:
            self.counts = batch
        elif self.counts.shape != batch.shape:
            raise ValueError(
                f"codes come from {batch.shape[0]} quantizer(s) but earlier batches from "
                f"{self.counts.shape[0]}"
            )
        else:
            self.counts += batch

    @property
    def num_quantizers(self) -> int:
        """Residual quantizers seen (0 before the first update)."""
        return 0 if self.counts is None else self.counts.shape[0]

    def compute(self, quantizer: int = 0) -> CodebookStats:
        """Stats of one residual quantizer's codes (default the first) over everything seen."""
        if self.counts is None:
            raise ValueError("CodebookUsage.compute() before any update(): no codes seen")
        if not 0 <= quantizer < self.num_quantizers:
            raise ValueError(
                f"quantizer {quantizer} out of range: codes come from {self.num_quantizers}"
            )
        return stats_from_histogram(self.counts[quantizer].clone())

    def per_quantizer(self) -> list[CodebookStats]:
        """Stats of every residual quantizer's codes."""
        return [self.compute(q) for q in range(self.num_quantizers)]


__all__ = [
    "PSNR_CAP_DB",
    "CodebookStats",
    "CodebookUsage",
    "ReconstructionMeter",
    "ReconstructionScores",
    "code_histogram",
    "codebook_stats",
    "psnr",
    "ssim",
    "stats_from_histogram",
]
