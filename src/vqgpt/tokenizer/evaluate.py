"""Evaluation: reconstruction quality and codebook usage of the image tokenizer on a held-out split."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vqgpt.config import ConfigError
from vqgpt.data.sources import collate
from vqgpt.figures import save_reconstruction_grid
from vqgpt.tokenizer.metrics import CodebookUsage, ReconstructionMeter
from vqgpt.tokenizer.vqvae import VQVAE


@dataclass
class EvalConfig:
    """How much held-out data the tokenizer is measured on."""

    max_images: int = 500  # 0 turns evaluation off
    batch_size: int = 64
    grid_images: int = 8  # originals + reconstructions written as a PNG grid

    def __post_init__(self) -> None:
        if self.max_images < 0 or self.batch_size < 1 or self.grid_images < 0:
            raise ConfigError("eval.max_images/grid_images must be >= 0 and eval.batch_size >= 1")


@dataclass
class TokenizerMetrics:
    """Held-out reconstruction quality and codebook use."""

    psnr: float
    ssim: float
    usage: float  # fraction of the K codes used at least once on the split
    perplexity: float
    num_images: int

    def to_log(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.4f}, codebook usage {100 * self.usage:.1f}%, "
            f"perplexity {self.perplexity:.1f} ({self.num_images} images)"
        )


@torch.no_grad()
def evaluate_tokenizer(
    model: VQVAE, dataset: Dataset, cfg: EvalConfig, grid_path: Path | None = None
) -> TokenizerMetrics:
    """PSNR, SSIM, codebook usage and perplexity of `model` on up to `cfg.max_images` images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = min(len(dataset), cfg.max_images)
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    usage, quality = CodebookUsage(model.codebook_size), ReconstructionMeter()
    first = None
    for batch in loader:
        pixels = batch["pixel_values"].to(device)
        codes = model.encode(pixels)
        recon = model.decode(codes)
        usage.update(codes)
        quality.update(pixels, recon)
        if first is None:
            first = (pixels[: cfg.grid_images].cpu(), recon[: cfg.grid_images].cpu())
    if grid_path is not None and first is not None and cfg.grid_images:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        save_reconstruction_grid(first[0], first[1], grid_path)
    model.train(was_training)
    stats, scores = usage.compute(), quality.compute()
    return TokenizerMetrics(
        psnr=scores.psnr,
        ssim=scores.ssim,
        usage=stats.usage,
        perplexity=stats.perplexity,
        num_images=scores.count,
    )
