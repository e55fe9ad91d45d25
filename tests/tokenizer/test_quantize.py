"""Vector quantizer: seed parity, straight-through, search, EMA, k-means, restarts, options."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vqgpt.tokenizer.quantize as quantize
from vqgpt.config import ConfigError, from_dict
from vqgpt.tokenizer.metrics import codebook_stats
from vqgpt.tokenizer.quantize import (
    QuantizerConfig,
    VectorQuantizer,
    kmeans,
    nearest_code,
    nearest_code_full,
)


class SeedVectorQuantizer(nn.Module):
    """The seed write-up's VectorQuantizer, verbatim (the reference for the "seed" preset)."""

    def __init__(self, num_embeddings, embedding_dim, beta=0.25):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1).contiguous()
        flat_x = x.reshape(-1, self.embedding_dim)
        distances = (
            torch.sum(flat_x**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2 * torch.matmul(flat_x, self.embedding.weight.t())
        )
        encoding_indices = torch.argmin(distances, dim=1)
        quantized = self.embedding(encoding_indices).view(x.shape)
        e_latent_loss = torch.mean((quantized.detach() - x) ** 2)
        q_latent_loss = torch.mean((quantized - x.detach()) ** 2)
        loss = q_latent_loss + self.beta * e_latent_loss
        quantized = x + (quantized - x).detach()
        quantized = quantized.permute(0, 3, 1, 2).contiguous()
        return quantized, loss, encoding_indices.view(x.shape[:-1])


def make(dim: int = 4, **kw) -> VectorQuantizer:
    """A quantizer from the default preset with `kw` on top."""
    kw.setdefault("codebook_size", 8)
    return VectorQuantizer(dim, from_dict(QuantizerConfig, dict(preset="default", **kw)))


def set_codes(vq: VectorQuantizer, codes: torch.Tensor, level: int = 0) -> None:
    """Overwrite one level's codes and keep its EMA state consistent (each seen once)."""
    cb = vq.codebooks[level]
    with torch.no_grad():
        cb.embed.copy_(codes)
        if vq.cfg.ema:
            cb.ema_cluster_size.fill_(1.0)
            cb.ema_embed_sum.copy_(codes)


def grid(vectors: torch.Tensor) -> torch.Tensor:
    """[N, D] vectors -> z_e [1, D, 1, N]."""
    return vectors.t()[None, :, None, :].contiguous()


# ---------------------------------------------------------------------------------------------
# seed parity


@pytest.mark.parametrize("k,d,hw", [(64, 16, 8), (512, 3, 5)])
def test_seed_preset_matches_seed_exactly(k, d, hw):
    torch.manual_seed(0)
    seed = SeedVectorQuantizer(k, d)
    vq = VectorQuantizer(d, from_dict(QuantizerConfig, dict(preset="seed", codebook_size=k)))
    assert isinstance(vq.codebooks[0].embed, nn.Parameter)
    assert vq.codebooks[0].embed.abs().max() <= 1.0 / k  # the seed's U(-1/K, 1/K)
    with torch.no_grad():
        vq.codebooks[0].embed.copy_(seed.embedding.weight)
    for _ in range(3):  # a few optimiser steps so the codebooks move
        z = torch.randn(2, d, hw, hw) * 0.05
        z_ref, z_new = z.clone().requires_grad_(), z.clone().requires_grad_()
        q_ref, loss_ref, idx_ref = seed(z_ref)
        out = vq(z_new)
        w = torch.randn_like(q_ref)
        ((q_ref * w).sum() + loss_ref).backward()
        ((out.quantized * w).sum() + out.loss).backward()
        assert torch.equal(out.codes, idx_ref)
        assert torch.equal(out.loss, loss_ref)
        assert torch.equal(out.quantized, q_ref)
        assert torch.equal(z_new.grad, z_ref.grad)
        assert torch.equal(vq.codebooks[0].embed.grad, seed.embedding.weight.grad)
        with torch.no_grad():
            for p in (vq.codebooks[0].embed, seed.embedding.weight):
                p -= 0.5 * p.grad
                p.grad = None


# ---------------------------------------------------------------------------------------------
# straight-through


FLAGS = [
    dict(),
    dict(ema=False),
    dict(num_quantizers=3),
    dict(l2_normalize=True),
    dict(codebook_dim=3),
    dict(codebook_dim=3, num_quantizers=2, ema=False),
]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_straight_through_gradient(flags):
    torch.manual_seed(1)
    vq = make(dim=5, **flags)
    z = torch.randn(2, 5, 3, 3, requires_grad=True)
    out = vq(z)
    w = torch.randn_like(out.quantized)
    (grad,) = torch.autograd.grad((out.quantized * w).sum(), z)

    # the same chain with the quantisation step replaced by the identity
    def identity_chain(x):
        x = x.permute(0, 2, 3, 1)
        if vq.proj_in is not None:
            x = vq.proj_in(x)
        if vq.cfg.l2_normalize:
            x = F.normalize(x, dim=-1)
        if vq.proj_out is not None:
            x = vq.proj_out(x)
        return x.permute(0, 3, 1, 2)

    (expected,) = torch.autograd.grad((identity_chain(z) * w).sum(), z)
    if not (flags.get("l2_normalize") or flags.get("codebook_dim")):
        assert torch.equal(grad, w)  # d/dz_e == d/dquantized, exactly
    torch.testing.assert_close(grad, expected)
    assert not torch.allclose(out.quantized, z)  # the forward did quantize


def test_losses_reach_encoder_and_codebook():
    torch.manual_seed(2)
    vq = make(dim=4, ema=False, kmeans_init=False, restart_after_steps=0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    q = vq.lookup(out.codes).detach()
    expected = 0.25 * 2 * (z - q) / z.numel()  # d/dz of beta * mean((z - sg[q])^2)
    torch.testing.assert_close(z.grad, expected)
    assert vq.codebooks[0].embed.grad.abs().sum() > 0
    torch.testing.assert_close(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(z, q))


# ---------------------------------------------------------------------------------------------
# the codebook diversity loss (quantizer.diversity_weight)


def full_table_diversity(z: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """log K - H(mean_n softmax_c(-||z_n - c||^2 / T)), the whole [N, K] table at once, with
    MAGVIT's log(m + 1e-5)."""
    p = torch.softmax(-torch.cdist(z, codes).pow(2) / temperature, dim=1)
    m = p.mean(0)
    return math.log(codes.shape[0]) + (m * (m + 1e-5).log()).sum()


def test_diversity_loss_is_the_full_table_one_computed_in_chunks_and_reaches_only_the_encoder():
    torch.manual_seed(5)
    vq = make(dim=3, codebook_size=12, ema=False, kmeans_init=False, restart_after_steps=0,
              diversity_weight=0.7, diversity_temperature=0.5, chunk_size=5)  # fmt: skip
    z_e = torch.randn(2, 3, 3, 4, requires_grad=True)  # 24 rows: 5 chunks, the last one short
    out = vq(z_e)
    codes = vq.codebooks[0].vectors.detach()
    rows = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3).requires_grad_()
    want = full_table_diversity(rows, codes, 0.5)
    torch.testing.assert_close(out.entropy_loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out.loss, out.codebook_loss + 0.25 * out.commitment_loss + 0.7 * want
    )
    (grad,) = torch.autograd.grad(out.entropy_loss, z_e, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want, rows)
    torch.testing.assert_close(
        grad.permute(0, 2, 3, 1).reshape(-1, 3), want_grad, rtol=1e-4, atol=1e-7
    )
    assert want_grad.abs().sum() > 0
    (to_codes,) = torch.autograd.grad(out.entropy_loss, vq.codebooks[0].embed, allow_unused=True)
    assert to_codes is None  # the codes move by the EMA / codebook loss only
    assert vq.eval()(z_e).entropy_loss.item() == 0.0  # a training loss


def test_diversity_loss_spreads_rows_piled_on_one_code_over_the_codebook():
    """Rows of a batch piled near one of 16 codes; descending the diversity loss alone spreads
    them over the codebook, while the commitment loss alone keeps them on one code."""
    k, g = 16, torch.Generator().manual_seed(6)
    used = {}
    for name, weight, beta in (("diversity", 1.0, 0.0), ("commitment", 0.0, 1.0)):
        vq = make(dim=2, codebook_size=k, ema=False, kmeans_init=False, restart_after_steps=0, beta=beta,
                  diversity_weight=weight, diversity_temperature=0.5)  # fmt: skip
        with torch.no_grad():  # a 4 x 4 grid of codes, 1 apart
            vq.codebooks[0].embed.copy_(torch.cartesian_prod(*[torch.arange(4.0)] * 2))
        vq.codebooks[0].embed.requires_grad_(False)
        z = (torch.randn(1, 2, 8, 8, generator=g) * 0.1).requires_grad_()  # 64 rows near (0, 0)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(150):
            out = vq(z)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        used[name] = vq(z).codes.unique().numel()
    assert used["commitment"] == 1
    assert used["diversity"] >= 12, used


def test_diversity_loss_is_off_by_default_and_checked():
    assert QuantizerConfig().diversity_weight == 0.0
    vq = make(dim=4)
    out = vq(torch.randn(2, 4, 3, 3))
    assert out.entropy_loss.item() == 0.0
    assert torch.equal(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)
    with pytest.raises(ConfigError, match="diversity_weight must be a finite number >= 0"):
        QuantizerConfig(diversity_weight=-1.0)
    with pytest.raises(ConfigError, match="diversity_temperature must be a finite number > 0"):
        QuantizerConfig(diversity_temperature=0.0)
    with pytest.raises(
        ConfigError, match="diversity_weight=0.1 means nothing for quantizer.type='fsq'"
    ):
        QuantizerConfig(type="fsq", codebook_size=16, fsq_levels=(4, 4), diversity_weight=0.1)


def test_diversity_weight_decays_linearly_to_zero_after_the_warm_up_and_is_checked():
    cfg = QuantizerConfig(diversity_weight=0.3, diversity_decay_steps=4, bypass_steps=2)
    weights = [cfg.diversity_weight_at(step) for step in range(9)]
    assert weights == pytest.approx([0.3, 0.3, 0.3, 0.225, 0.15, 0.075, 0.0, 0.0, 0.0])
    constant = QuantizerConfig(diversity_weight=0.3, bypass_steps=2)
    assert {constant.diversity_weight_at(step) for step in range(9)} == {0.3}
    with pytest.raises(ConfigError, match="diversity_decay_steps must be >= 0"):
        QuantizerConfig(diversity_weight=0.3, diversity_decay_steps=-1)
    with pytest.raises(ConfigError, match="decays quantizer.diversity_weight, which is 0"):
        QuantizerConfig(diversity_decay_steps=10)
    with pytest.raises(ConfigError, match="diversity_decay_steps=10 means nothing for quantizer"):
        QuantizerConfig(type="fsq", codebook_size=16, fsq_levels=(4, 4), diversity_decay_steps=10)


def test_the_quantizers_diversity_weight_now_weighs_the_loss_and_zero_skips_it():
    torch.manual_seed(7)
    vq = make(dim=3, codebook_size=12, ema=False, kmeans_init=False, restart_after_steps=0,
              diversity_weight=0.7, diversity_temperature=0.5)  # fmt: skip
    z_e = torch.randn(2, 3, 3, 4)
    vq.diversity_weight = 0.2  # as the training loop sets it from diversity_weight_at(step)
    out = vq(z_e)
    assert out.entropy_loss.item() > 0
    torch.testing.assert_close(
        out.loss, out.codebook_loss + 0.25 * out.commitment_loss + 0.2 * out.entropy_loss
    )
    vq.diversity_weight = 0.0
    out = vq(z_e)
    assert out.entropy_loss.item() == 0.0
    assert torch.equal(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)


# ---------------------------------------------------------------------------------------------
# nearest-code search


@pytest.mark.parametrize("k,d", [(5, 1), (33, 3), (256, 16)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_search_equals_full_search(k, d, chunk):
    g = torch.Generator().manual_seed(k * 100 + d)
    x = torch.randn(301, d, generator=g, dtype=torch.float64)
    e = torch.randn(k, d, generator=g, dtype=torch.float64)
    brute = torch.cdist(x, e).argmin(dim=1)
    assert torch.equal(nearest_code(x, e, chunk), brute)
    assert torch.equal(nearest_code_full(x, e), brute)
    # in float32 the two formulas round differently; any disagreement must be a near tie
    x32, e32 = x.float(), e.float()
    chunked = nearest_code(x32, e32, chunk)
    assert torch.equal(chunked, nearest_code(x32, e32, 4096))  # chunking changes nothing
    full = nearest_code_full(x32, e32)
    dist = torch.cdist(x, e) ** 2
    rows = torch.arange(len(x))
    gap = (dist[rows, chunked] - dist[rows, full]).abs()
    assert (gap <= 1e-4 * (1 + dist[rows, full])).all()
    assert (chunked == full).float().mean() > 0.97


def test_search_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"codebook \[K, D\]"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 2), 4)


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update_matches_hand_computation():
    cfg = from_dict(
        QuantizerConfig,
        dict(preset="default", codebook_size=2, ema_decay=0.5, ema_eps=0.1, kmeans_init=False),
    )
    vq = VectorQuantizer(2, cfg)
    set_codes(vq, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = grid(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [12.0, 12.0]]))
    out = vq(z)
    assert out.codes.flatten().tolist() == [0, 0, 0, 1]
    # quantized uses the codes the search saw (before the update)
    assert torch.equal(out.quantized, grid(torch.tensor([[0.0, 0], [0, 0], [0, 0], [10, 10]])))
    cb = vq.codebooks[0]
    # counts [3, 1]; sums [(3, 3), (12, 12)]
    # size = 0.5 * 1 + 0.5 * counts = [2, 1]; embed_sum = 0.5 * e + 0.5 * sums
    torch.testing.assert_close(cb.ema_cluster_size, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(cb.ema_embed_sum, torch.tensor([[1.5, 1.5], [11.0, 11.0]]))
    # Laplace: (size + 0.1) / (3 + 2 * 0.1) * 3 = [1.96875, 1.03125]
    expected = torch.tensor([[1.5 / 1.96875] * 2, [11.0 / 1.03125] * 2])
    torch.testing.assert_close(cb.embed, expected)
    assert out.codebook_loss == 0  # EMA replaces the codebook loss
    assert not cb.embed.requires_grad
    # eval forwards leave the codebook alone
    vq.eval()
    vq(z)
    torch.testing.assert_close(cb.embed, expected)


# ---------------------------------------------------------------------------------------------
# k-means init, restarts


def clusters(n_per: int, centers: torch.Tensor, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pts = centers.repeat_interleave(n_per, dim=0)
    return pts + spread * torch.randn(pts.shape, generator=g)


@pytest.mark.parametrize("ema", [True, False])
def test_kmeans_init_runs_once_and_finds_clusters(ema):
    torch.manual_seed(3)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    vq = make(dim=2, codebook_size=4, ema=ema, restart_after_steps=0)
    assert not vq.codebooks[0].initialized
    vq.eval()
    vq(grid(clusters(10, centers)))
    assert not vq.codebooks[0].initialized  # eval never initialises
    vq.train()
    out = vq(grid(clusters(10, centers)))
    assert vq.codebooks[0].initialized
    assert codebook_stats(out.codes, 4).usage == 1.0
    found = vq.codebook[torch.cdist(centers, vq.codebook).argmin(dim=1)]
    torch.testing.assert_close(found, centers, atol=0.1, rtol=0)
    before = vq.codebook.clone()
    vq(grid(clusters(10, centers + 1.0, seed=1)))
    if not ema:  # a second training forward must not re-run k-means
        assert torch.equal(vq.codebook, before)


def test_kmeans_with_fewer_vectors_than_codes():
    torch.manual_seed(4)
    x = torch.randn(3, 2)
    centroids, counts = kmeans(x, 8, iters=5)
    assert centroids.shape == (8, 2) and counts.sum() == 3
    assert (torch.cdist(centroids, x).min(dim=1).values < 1e-6).all()  # all drawn from the data


def test_spherical_kmeans_keeps_unit_centroids():
    torch.manual_seed(12)
    x = F.normalize(torch.randn(64, 3), dim=1)
    centroids, counts = kmeans(x, 4, iters=3, cosine=True)
    assert counts.sum() == 64 and (counts > 1).any()
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("ema", [True, False])
def test_restarts_revive_dead_codes(ema):
    torch.manual_seed(5)
    vq = make(dim=2, codebook_size=16, ema=ema, kmeans_init=False, restart_after_steps=2)
    set_codes(vq, torch.full((16, 2), 100.0) + 0.01 * torch.randn(16, 2))  # all far from data
    if ema:  # heavy EMA history that a restart must forget
        vq.codebooks[0].ema_cluster_size.fill_(1000.0)
        vq.codebooks[0].ema_embed_sum.mul_(1000.0)

    centers = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def data(step: int) -> torch.Tensor:
        return grid(clusters(8, centers, spread=0.5, seed=step))

    usages = [codebook_stats(vq(data(0)).codes, 16).usage]
    assert usages[0] == 1 / 16
    for step in range(1, 4):
        usages.append(codebook_stats(vq(data(step)).codes, 16).usage)
    assert vq.codebooks[0].unused_steps.max() < 2
    assert usages[-1] >= 0.5 > usages[0]
    near_data = vq.codebook.norm(dim=1) < 10
    assert near_data.sum() >= 15  # the dead codes moved onto the data
    if ema:  # their EMA state was reset along with them
        assert (vq.codebooks[0].ema_cluster_size[near_data] < 50).all()


@pytest.mark.parametrize("rule", ["unused-steps", "threshold"])
def test_a_dead_code_threshold_reseeds_codes_used_less_than_it(rule):
    """`dead_code_threshold` (SoundStream's rule) re-seeds a code used once a step, which
    `restart_after_steps` never does: it is never unused."""
    torch.manual_seed(7)
    if rule == "threshold":
        vq = make(dim=2, codebook_size=4, kmeans_init=False, ema_decay=0.5,
                  restart_after_steps=0, dead_code_threshold=2.0)  # fmt: skip
    else:
        vq = make(dim=2, codebook_size=4, kmeans_init=False, ema_decay=0.5, restart_after_steps=2)
    lone = torch.tensor([[9.0, 9.0]])
    set_codes(vq, torch.cat([torch.zeros(1, 2), lone, torch.tensor([[50.0, 50], [60, 60]])]))
    cb = vq.codebooks[0]
    for step in range(4):  # 31 vectors near 0, one on the lone code, every step
        bulk = 0.01 * torch.randn(31, 2, generator=torch.Generator().manual_seed(step))
        vq(grid(torch.cat([bulk, lone])))
    lone_kept = torch.allclose(vq.codebook[1], lone[0], atol=1e-3)
    assert cb.ema_cluster_size[0] > 2  # the busy code stays above the threshold: kept
    assert (vq.codebook[2:].norm(dim=1) < 1).all()  # the unused ones are, by either rule
    if rule == "threshold":
        assert not lone_kept  # used once a step: below 2, re-seeded (onto the bulk)
        assert cb.ema_cluster_size.min() >= 1.0  # re-seeded codes start at the threshold
    else:
        assert lone_kept


@pytest.mark.parametrize("sampling", ["error", "uniform"])
def test_dead_code_sampling_picks_badly_served_vectors_or_any(sampling):
    """Sampling "error" re-seeds dead codes on the vectors the codebook serves worst (here the 10 of
    1,000 far from the only live code); "uniform" draws any vector alike (the peer's rule), so
    about 32 x 10 / 1,000 of its 32 new codes land there."""
    torch.manual_seed(3)
    vq = make(dim=2, codebook_size=33, kmeans_init=False, restart_after_steps=1,
              dead_code_sampling=sampling)  # fmt: skip
    set_codes(vq, torch.cat([torch.zeros(1, 2), 50.0 + torch.randn(32, 2)]))  # 32 far: dead
    bulk = 0.01 * torch.randn(990, 2)
    rare = torch.tensor([5.0, 5.0]) + 0.01 * torch.randn(10, 2)
    vq(grid(torch.cat([bulk, rare])))
    fresh = vq.codebook[1:]
    assert (fresh.norm(dim=1) < 10).all()  # every dead code re-seeded from the batch
    on_rare = int(((fresh - torch.tensor([5.0, 5.0])).norm(dim=1) < 0.1).sum())
    if sampling == "error":
        assert on_rare == 10  # every badly served vector first
    else:
        assert on_rare <= 3


def test_dead_code_sampling_is_checked():
    with pytest.raises(ConfigError, match="dead_code_sampling='nearest' is unknown"):
        QuantizerConfig(dead_code_sampling="nearest")


def test_a_dead_code_threshold_needs_the_ema_statistics():
    with pytest.raises(ConfigError, match="dead_code_threshold needs ema"):
        QuantizerConfig(ema=False, dead_code_threshold=2.0)
    with pytest.raises(ConfigError, match="dead_code_threshold must be >= 0"):
        QuantizerConfig(dead_code_threshold=-1.0)


def test_no_restarts_when_disabled():
    vq = make(dim=2, codebook_size=4, kmeans_init=False, restart_after_steps=0, ema=False)
    set_codes(vq, torch.tensor([[0.0, 0.0], [50, 50], [60, 60], [70, 70]]))
    for _ in range(5):
        vq(grid(torch.randn(10, 2)))
    assert vq.codebook[1:].min() >= 50
    assert not hasattr(vq.codebooks[0], "unused_steps")


# ---------------------------------------------------------------------------------------------
# options: l2, factorised, residual


def test_l2_normalize_searches_by_cosine():
    torch.manual_seed(6)
    vq = make(dim=3, l2_normalize=True, kmeans_init=False)
    vq.eval()
    z = torch.randn(2, 3, 4, 4) * 7
    out = vq(z)
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 4, 4))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    cosine = F.normalize(flat, dim=1) @ vq.codebook.t()
    assert torch.equal(out.codes.flatten(), cosine.argmax(dim=1))


def test_factorised_codes_live_in_small_space():
    torch.manual_seed(7)
    vq = make(dim=6, codebook_dim=2, ema=False, kmeans_init=False)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = vq(z)
    assert vq.codebook.shape == (8, 2)
    assert out.quantized.shape == z.shape and out.codes.shape == (2, 3, 3)
    out.loss.backward()
    assert vq.proj_in.weight.grad.abs().sum() > 0  # commitment trains the projection
    vq.eval()
    torch.testing.assert_close(vq.lookup(vq(z).codes), vq(z).quantized)


def test_residual_levels_shapes_and_error():
    torch.manual_seed(8)
    z = torch.randn(4, 4, 6, 6)
    errors = []
    for levels in (1, 2, 4):
        vq = make(dim=4, codebook_size=16, num_quantizers=levels)
        vq(z)  # k-means init of every level on its residual
        vq.eval()
        out = vq(z)
        assert out.codes.shape == ((4, 6, 6) if levels == 1 else (4, 6, 6, levels))
        assert vq.codebook.shape == ((16, 4) if levels == 1 else (levels, 16, 4))
        torch.testing.assert_close(vq.lookup(out.codes), out.quantized)
        errors.append(F.mse_loss(out.quantized, z).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.6 * errors[0]


def test_invalid_inputs_speak_to_the_user():
    with pytest.raises(ValueError, match="l2_normalize with num_quantizers > 1"):
        make(l2_normalize=True, num_quantizers=2)
    vq = make(dim=4)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        vq(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="codes must lie in"):
        vq.lookup(torch.full((1, 2, 2), 8))


# ---------------------------------------------------------------------------------------------
# dtype, state, statistics


def test_bf16_autocast_keeps_float32_math(monkeypatch):
    torch.manual_seed(9)
    vq = make(dim=4, codebook_dim=3, kmeans_init=False)
    vq.eval()
    z = torch.randn(2, 4, 5, 5).bfloat16()
    seen = []
    real = quantize.nearest_code

    def spy(x, codebook, chunk_size):
        seen.append((x.dtype, codebook.dtype, torch.is_autocast_enabled("cpu")))
        return real(x, codebook, chunk_size)

    monkeypatch.setattr(quantize, "nearest_code", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    ref = vq(z.float())
    assert seen == [(torch.float32, torch.float32, False)] * 2
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.quantized, ref.quantized.bfloat16())
    assert torch.equal(out.loss, ref.loss)


def test_state_dict_round_trip_keeps_initialized_and_codes():
    torch.manual_seed(10)
    vq = make(dim=3, codebook_size=8, num_quantizers=2)
    z = torch.randn(2, 3, 5, 5)
    vq(z)
    state = vq.state_dict()
    assert state["codebooks.1.initialized"].item() is True
    torch.manual_seed(11)
    fresh = make(dim=3, codebook_size=8, num_quantizers=2, ema=True)
    fresh.load_state_dict(state)
    assert all(cb.initialized for cb in fresh.codebooks)
    vq.eval(), fresh.eval()
    assert torch.equal(fresh(z).codes, vq(z).codes)
    before = fresh.codebook.clone()
    fresh.train()
    fresh(torch.randn(2, 3, 5, 5) + 50)  # k-means here would move codes ~50; EMA moves them ~4
    assert (fresh.codebook - before).abs().max() < 10


# ---------------------------------------------------------------------------------------------
# benchmark smoke run


def test_benchmark_quick_run_prints_a_table(repo_root, python_forked):
    script = repo_root / "scripts" / "bench_quantizer.py"
    python, env = python_forked()
    result = subprocess.run(
        [*python, str(script), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 2  # naive + one chunk size
    naive, chunked = (row.split("|") for row in rows)
    assert float(chunked[8]) < float(naive[8])  # the chunked search needs less memory
    assert chunked[-2].strip() == "100.000%"  # and finds the same codes
