"""PSNR / SSIM against hand computations and skimage; codebook usage and perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from vqgpt.tokenizer.metrics import (
    PSNR_CAP_DB,
    CodebookUsage,
    ReconstructionMeter,
    codebook_stats,
    psnr,
    ssim,
)


def _smooth_images(batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Natural-ish test images in [-1, 1]: blurred noise plus a gradient."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, h // 4, w // 4, generator=g)
    base = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    ramp = torch.linspace(0, 0.3, w).expand(batch, 3, h, w)
    return (base * 0.7 + ramp) * 2 - 1


def test_psnr_matches_hand_computation() -> None:
    a = torch.zeros(3, 3, 8, 8)  # 0.5 on the [0, 1] scale
    b = a.clone()
    b[0] += 0.2  # unit-scale error 0.1 -> MSE 1e-2 -> 20 dB
    b[1] += 0.02  # unit-scale error 0.01 -> MSE 1e-4 -> 40 dB
    b[2, :, :4] += 0.2  # half the pixels off by 0.1 -> MSE 5e-3
    got = psnr(a, b)
    assert got.shape == (3,)
    expected = [20.0, 40.0, 10 * math.log10(1 / 5e-3)]
    assert got.tolist() == pytest.approx(expected, abs=1e-3)


def test_psnr_identical_is_capped_and_values_are_clamped() -> None:
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    # out-of-range reconstructions are compared as the clamped image a viewer would see
    ones = torch.ones(1, 3, 8, 8)
    assert psnr(ones, ones * 1.5).item() == PSNR_CAP_DB
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:, :, :4])


def test_ssim_identical_noisy_and_monotone() -> None:
    x = _smooth_images(1, 32, 32, seed=0)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.02, 0.1, 0.3)]
    assert all(s < 1.0 for s in scores)
    assert scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


@pytest.mark.parametrize(("h", "w", "seed"), [(32, 32, 2), (24, 40, 3)])
def test_ssim_matches_skimage(h: int, w: int, seed: int) -> None:
    a = _smooth_images(2, h, w, seed)
    g = torch.Generator().manual_seed(seed + 100)
    b = (a + 0.15 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ours = ssim(a, b)
    for i in range(2):
        x = ((a[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        y = ((b[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        ref = structural_similarity(
            x,
            y,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-3)


def test_reconstruction_meter_weights_by_image() -> None:
    a = torch.zeros(4, 3, 16, 16)
    b = a.clone()
    b[0] += 0.2  # 20 dB; the other three differ by 0.02 -> 40 dB
    b[1:] += 0.02
    meter = ReconstructionMeter()
    meter.update(a[:1], b[:1])
    meter.update(a[1:], b[1:])
    scores = meter.compute()
    assert scores.count == 4
    assert scores.psnr == pytest.approx((20 + 3 * 40) / 4, abs=1e-3)  # not the mean of batch means
    assert scores.ssim == pytest.approx(ssim(a, b).mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="before any update"):
        ReconstructionMeter().compute()


def test_codebook_stats_on_hand_built_histogram() -> None:
    even = codebook_stats(torch.tensor([[0, 0], [1, 1]]), codebook_size=4)
    assert even.usage == 0.5 and even.perplexity == pytest.approx(2.0)
    assert even.histogram.tolist() == [2, 2, 0, 0]
    skewed = codebook_stats(torch.tensor([0, 0, 0, 1]), codebook_size=4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed.perplexity == pytest.approx(math.exp(entropy))
    assert codebook_stats(torch.arange(8), 8).perplexity == pytest.approx(8.0)
    assert codebook_stats(torch.zeros(5, dtype=torch.long), 8).perplexity == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_stats(torch.tensor([0, 4]), 4)


def test_codebook_usage_accumulates_per_quantizer() -> None:
    g = torch.Generator().manual_seed(0)
    k = 16
    batches = [torch.randint(0, k, (2, 4, 4), generator=g) for _ in range(3)]
    usage = CodebookUsage(k)
    for codes in batches:
        usage.update(codes)
    whole = codebook_stats(torch.cat(batches), k)
    got = usage.compute()
    assert usage.num_quantizers == 1
    assert torch.equal(got.histogram, whole.histogram)
    assert got.perplexity == pytest.approx(whole.perplexity) and got.usage == whole.usage

    residual = CodebookUsage(k)
    codes = torch.stack([torch.zeros(2, 4, 4, dtype=torch.long), batches[0]], dim=-1)
    residual.update(codes)  # (B, h, w, L=2): quantizer 0 collapsed to one code
    assert residual.num_quantizers == 2
    assert residual.compute().usage == 1 / k and residual.compute().perplexity == pytest.approx(1.0)
    assert torch.equal(residual.compute(1).histogram, codebook_stats(batches[0], k).histogram)
    assert len(residual.per_quantizer()) == 2
    with pytest.raises(ValueError, match="quantizer"):
        residual.update(batches[1])
    with pytest.raises(ValueError, match="out of range"):
        residual.compute(2)


def test_ssim_float_inputs_any_dtype() -> None:
    x = _smooth_images(1, 16, 16, seed=5)
    assert ssim(x.double(), x.half().float()).dtype == torch.float32
    assert np.isfinite(ssim(x, -x).item())
