"""Quantizer families (`quantizer.type`: vq, simvq, fsq, lfq): FSQ and LFQ ids <-> codes are
bijections and the forward value is the chosen id's code; gradients reach the encoder; SimVQ's
map moves every code (plain VQ's gradient leaves unused codes where they are); LFQ's entropy
penalty is the full-table formula; each family trains through the CLI and loads in the export's
quantizer; config mistakes are one-line errors. (The exports without vqgpt: tests/export.)"""

from __future__ import annotations

import math

import pytest
import torch

from vqgpt.config import ConfigError, to_dict
from vqgpt.export.hub import quantization_vqgpt as hub
from vqgpt.tokenizer.families import FAMILIES, build_quantizer
from vqgpt.tokenizer.fsq import FSQ
from vqgpt.tokenizer.lfq import LFQ, entropy_penalty
from vqgpt.tokenizer.quantize import FAMILY_FIELDS, QuantizerConfig, VectorQuantizer
from vqgpt.tokenizer.vqvae import VQVAEConfig
from vqgpt.training import read_metrics

SCALAR = {  # name -> (latent dim, config): no projection, so z_e is the search space
    "fsq_3x4x2": (3, dict(type="fsq", fsq_levels=(3, 4, 2), codebook_size=24)),
    "fsq_8x5x5x5": (4, dict(type="fsq", fsq_levels=(8, 5, 5, 5), codebook_size=1000)),
    "lfq_d4": (4, dict(type="lfq", codebook_size=16)),
    "lfq_d6": (6, dict(type="lfq", codebook_size=64)),
}


def scalar(name: str) -> FSQ | LFQ:
    dim, cfg = SCALAR[name]
    return build_quantizer(dim, QuantizerConfig(**cfg))


def grid(rows: torch.Tensor) -> torch.Tensor:
    """Rows [N, d] (N = 4 * n) as z_e [4, d, n, 1]."""
    return rows.reshape(4, -1, 1, rows.shape[1]).permute(0, 3, 1, 2)


def preimage(q: FSQ | LFQ, ids: torch.Tensor) -> torch.Tensor:
    """A search-space row [len(ids), d] that each id's cell holds: lfq the code itself; fsq the
    point whose bound is exactly the rounded integer, atanh((r + o) / h) - s (fsq_bound's
    constants)."""
    if q.kind == "lfq":
        return q.vectors_of(ids)
    size = torch.tensor(q.levels, dtype=torch.float64)
    half_l = (size - 1) * (1 + hub.FSQ_EPS) / 2
    offset = torch.where(size % 2 == 0, 0.5, 0.0).double()
    r = hub.ids_to_digits(ids, q.levels).double() - torch.div(size, 2, rounding_mode="floor")
    return (torch.atanh((r + offset) / half_l) - torch.atanh(offset / half_l)).float()


# ---------------------------------------------------------------------------------------------
# fsq and lfq: ids <-> codes


@pytest.mark.parametrize("name", list(SCALAR))
def test_scalar_ids_and_codes_are_a_bijection_over_all_k(name):
    q = scalar(name)
    k, d = q.codebook_size, len(q.levels)
    ids = torch.arange(k)
    codes = q.vectors_of(ids)  # (K, d)
    assert codes.shape == (k, d) and codes.abs().max() <= 1
    assert torch.unique(codes, dim=0).shape[0] == k  # K distinct codes: ids -> codes injective
    digits = q.digits(codes) if q.kind == "lfq" else None  # lfq's codes are their own signs
    if digits is not None:
        assert torch.equal(hub.digits_to_ids(digits, q.levels), ids)
    assert torch.equal(hub.digits_to_ids(hub.ids_to_digits(ids, q.levels), q.levels), ids)
    # the search reaches every id (from a point inside its cell): codes -> ids is onto
    assert torch.equal(q.search(grid(preimage(q, ids))).reshape(-1), ids)
    # the forward value is the chosen id's code, and the export's search chooses the same ids
    z = torch.randn(4000, d, generator=torch.Generator().manual_seed(0)) * 2
    out = q.train()(grid(z))
    found = out.codes.reshape(-1)
    assert found.min() >= 0 and found.max() < k
    value = out.quantized.permute(0, 2, 3, 1).reshape(-1, d)
    torch.testing.assert_close(value, q.vectors_of(found), rtol=0, atol=1e-6)
    assert torch.equal(q.search(grid(z)), out.codes)  # the export's search, the same ids


def test_lfq_codes_are_signs_and_ids_their_binary_number():
    q = scalar("lfq_d4")
    z = torch.tensor([[0.3, -2.0, 1e-4, 5.0], [-1.0, -1.0, -1.0, 0.0]] * 2)  # (4, 4)
    out = q.eval()(grid(z))
    assert out.codes.reshape(-1).tolist() == [1 + 4 + 8, 0] * 2  # bit j = [z_j > 0], weight 2^j
    expected = torch.tensor([[1.0, -1, 1, 1], [-1, -1, -1, -1]] * 2)
    assert torch.equal(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4), expected)


def test_fsq_rounds_the_bounded_value_per_paper():
    q = scalar("fsq_3x4x2")  # levels 3 (odd: values -1, 0, 1), 4 and 2 (even: offset 1/2)
    z = torch.tensor([[0.0, 0.0, 0.0], [9.0, 9.0, 9.0], [-9.0, -9.0, -9.0], [0.6, -0.3, 0.2]])
    out = q.eval()(grid(z))
    half = torch.tensor([1.0, 2.0, 1.0])
    bound = hub.fsq_bound(z, q.levels)
    expected = torch.round(bound) / half
    value = out.quantized.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    # z = 0: digits (1, 2, 1) -> id 1 + 2*3 + 1*12; saturated ends: the first and last digits
    assert out.codes.reshape(-1)[:3].tolist() == [1 + 2 * 3 + 12, 2 + 3 * 3 + 12, 0]


@pytest.mark.parametrize("name", ["fsq_3x4x2", "lfq_d4", "simvq"])
def test_gradients_reach_the_encoder_through_the_code_step(name):
    if name == "simvq":
        q = build_quantizer(4, QuantizerConfig(type="simvq", codebook_size=8))
    else:
        q = scalar(name)
    d = 3 if name.startswith("fsq") else 4
    z_e = grid(torch.randn(16, d)).clone().requires_grad_(True)
    out = q.train()(z_e)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z_e.grad is not None and (z_e.grad.abs() > 0).all()


# ---------------------------------------------------------------------------------------------
# simvq: every code moves


def one_sgd_step_moves(quantizer, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which codes the batch chose [K] bool, how far each code moved in one SGD step [K])."""
    quantizer.train()
    before = quantizer.codebook.detach().clone()
    out = quantizer(z_e)
    params = [p for p in quantizer.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=0.1).zero_grad()
    out.loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    used = torch.bincount(out.codes.reshape(-1), minlength=before.shape[0]) > 0
    return used, (quantizer.codebook.detach() - before).norm(dim=1)


def test_simvq_map_moves_every_code_where_plain_vq_moves_only_the_used_ones():
    torch.manual_seed(0)
    k = 32
    simvq = build_quantizer(4, QuantizerConfig(type="simvq", codebook_size=k))
    assert not any(n == "frozen_codebook" for n, _ in simvq.named_parameters())  # a buffer
    target = simvq.codebook[3].detach()
    z_e = grid(target + 0.01 * torch.randn(16, 4))  # every row next to code 3
    used, moved = one_sgd_step_moves(simvq, z_e)
    assert used.sum() < k // 4  # most codes unused by this batch ...
    assert (moved[~used] > 1e-6).all()  # ... and yet every one of them moved with the map
    # the same batch through plain VQ with a gradient-trained codebook: unused codes stay put,
    # so the check above is one plain VQ would fail
    plain = QuantizerConfig(codebook_size=k, ema=False, kmeans_init=False, restart_after_steps=0)
    vq = VectorQuantizer(4, plain)
    vq.codebooks[0].embed.data.copy_(simvq.codebook.detach())
    used, moved = one_sgd_step_moves(vq, z_e)
    assert (moved[~used] == 0).all() and (moved[used] > 0).all()


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_simvq_forward_is_the_chosen_code_and_its_losses_are_vqs(estimator):
    torch.manual_seed(1)
    q = build_quantizer(4, QuantizerConfig(type="simvq", codebook_size=16, estimator=estimator))
    z = torch.randn(16, 4)
    out = q.train()(grid(z))
    chosen = q.codebook.detach()[out.codes.reshape(-1)]
    value = out.quantized.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(value, chosen, rtol=0, atol=1e-5)
    assert torch.equal(out.codes.reshape(-1), hub.nearest_code(z, q.codebook.detach(), 256))
    mse = (z - chosen).pow(2).mean()
    torch.testing.assert_close(out.commitment_loss, mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.loss, mse + 0.25 * mse)


# ---------------------------------------------------------------------------------------------
# lfq: the entropy penalty


def full_table_penalty(
    z: torch.Tensor, codebook: torch.Tensor, t: float, eps: float = 1e-5
) -> torch.Tensor:
    """MAGVIT-v2's E[H(p)] - H(E[p]), p = softmax(-||z - c||^2 / T) over the whole [N, K] table;
    H(E[p]) as in the authors' losses.py, -sum m log(m + eps) (eps 0: the exact entropy)."""
    p = torch.softmax(-torch.cdist(z, codebook).pow(2) / t, dim=-1)  # (N, K)
    per_sample = -(p * p.clamp(min=1e-300).log()).sum(-1).mean()
    m = p.mean(0)
    return per_sample + (m * (m + eps).clamp(min=1e-300).log()).sum()


def test_lfq_entropy_penalty_is_the_full_table_one_computed_in_chunks():
    q = scalar("lfq_d4")
    codebook = q.vectors_of(torch.arange(16))
    z = (torch.randn(20, 4, generator=torch.Generator().manual_seed(2)) * 0.3).requires_grad_()
    got = entropy_penalty(z, codebook, 0.5, chunk_size=3)  # 7 chunks, the last one short
    (grad,) = torch.autograd.grad(got, z)
    want = full_table_penalty(z, codebook, 0.5)
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_lfq_batch_entropy_has_magvits_epsilon_for_the_codes_a_batch_leaves_unused():
    """Confident rows (T = 0.01) on a few of 1,024 codes: most codes' batch mean probability is far
    below 1e-5, where the exact entropy's pull towards them (-log m - 1) grows without bound and
    MAGVIT's log(m + 1e-5) caps it. The gradient is the float64 one with the epsilon, and not the
    exact entropy's (vqgpt's LFQ used that until 2026-12-01: docs/results.md, issue 15 fifth
    round). A small change per step (0.14% of this gradient), far above float32 rounding."""
    q = build_quantizer(10, QuantizerConfig(type="lfq", codebook_size=1024))
    codebook = q.vectors_of(torch.arange(1024))
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(64, 10, generator=g) * 0.3).requires_grad_()
    (grad,) = torch.autograd.grad(entropy_penalty(z, codebook, 0.01, chunk_size=16), z)
    z64 = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(full_table_penalty(z64, codebook.double(), 0.01), z64)
    (exact,) = torch.autograd.grad(full_table_penalty(z64, codebook.double(), 0.01, eps=0.0), z64)
    assert (grad.double() - want).norm() < 1e-4 * want.norm()  # float32 against float64
    assert (exact - want).norm() > 1e-3 * want.norm()  # the epsilon moves it 10x more than that


def test_lfq_entropy_penalty_rewards_using_every_code_confidently():
    q = scalar("lfq_d4")
    codebook = q.vectors_of(torch.arange(16))
    every_code = entropy_penalty(codebook * 3, codebook, 0.01, 256)  # each code once, far out
    one_code = entropy_penalty(codebook[:1].repeat(16, 1) * 3, codebook, 0.01, 256)
    assert every_code.item() == pytest.approx(math.log(1 / 16 + 1e-5), abs=1e-4)  # ~ -log 16
    assert one_code.item() == pytest.approx(0.0, abs=1e-4)


def test_lfq_loss_is_weighted_commitment_plus_weighted_entropy_in_training_only():
    cfg = QuantizerConfig(type="lfq", codebook_size=16, beta=0.5, entropy_weight=2.0)
    q = LFQ(4, cfg)
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    out = q.train()(grid(z))
    commitment = (z - torch.where(z > 0, 1.0, -1.0)).pow(2).mean()
    penalty = entropy_penalty(z, q.vectors_of(torch.arange(16)), cfg.entropy_temperature, 256)
    torch.testing.assert_close(out.commitment_loss, commitment)
    torch.testing.assert_close(out.entropy_loss, penalty)
    torch.testing.assert_close(out.loss, 0.5 * commitment + 2.0 * penalty)
    assert q.eval()(grid(z)).entropy_loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# one interface: vqgpt's modules load into the export's


QUANTIZERS = {
    "vq": dict(codebook_size=16),
    "simvq": dict(type="simvq", codebook_size=16),
    "fsq": dict(type="fsq", fsq_levels=[4, 2, 2], codebook_size=16, codebook_dim=3),
    "lfq": dict(type="lfq", codebook_size=16, codebook_dim=4),
}


def test_every_family_has_a_module_and_the_export_builds_each():
    assert list(FAMILIES) == list(FAMILY_FIELDS) == list(hub.QUANTIZER_TYPES)
    assert set(QUANTIZERS) == set(FAMILIES)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_training_quantizer_state_loads_into_the_exports_and_gives_its_codes(name):
    torch.manual_seed(0)
    cfg = QuantizerConfig(**QUANTIZERS[name])
    ours = build_quantizer(8, cfg).train()
    z_e = torch.randn(2, 8, 4, 4)
    ours(z_e)  # a training step's updates (k-means, EMA) where the family has them
    ours.eval()
    theirs = hub.build_quantizer(8, to_dict(cfg))
    state = {k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()}
    theirs.load_state_dict(state)
    codes = ours(z_e).codes
    assert torch.equal(theirs.search(z_e), codes)
    assert torch.equal(theirs.lookup(codes), ours.lookup(codes))


# ---------------------------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(type="pq"), "quantizer.type='pq' is unknown"),
        (dict(type="fsq", codebook_size=8), "needs quantizer.fsq_levels"),
        (dict(type="fsq", fsq_levels=(1, 8), codebook_size=8), "a list of ints >= 2"),
        (dict(type="fsq", fsq_levels=(8, 5), codebook_size=1024), "K = prod(levels) = 40"),
        (dict(type="lfq", codebook_size=1000), "1000 is not a power of two"),
        (dict(type="lfq", codebook_size=16, codebook_dim=5), "must be 4 = log2(codebook_size)"),
        (dict(type="fsq", fsq_levels=(4, 4), codebook_size=16, codebook_dim=3), "must be 2 ="),
        (dict(type="fsq", fsq_levels=(2, 2), codebook_size=4, ema=False), "quantizer.ema=False"),
        (dict(type="simvq", preset="seed"), "quantizer.preset='seed' means nothing"),
        (dict(type="lfq", codebook_size=16, estimator="rotation"), "estimator='rotation'"),
        (dict(fsq_levels=(2, 2)), "only fsq read it"),
        (dict(type="simvq", entropy_weight=1.0), "only lfq read it"),
        (dict(type="lfq", codebook_size=16, entropy_temperature=0.0), "must be a finite"),
    ],
)
def test_config_mistakes_are_one_line_errors(fields, words):
    with pytest.raises(ConfigError) as err:
        QuantizerConfig(**fields)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_code_dim_that_does_not_fit_the_latent_dim_is_a_config_error():
    arch = dict(image_size=16, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4)
    with pytest.raises(ConfigError, match=r"model.latent_dim=8 but must be 3 = len\(fsq_levels\)"):
        VQVAEConfig(
            architecture=arch, quantizer=dict(type="fsq", fsq_levels=[3, 4, 2], codebook_size=24)
        )
    with pytest.raises(ConfigError, match="set quantizer.codebook_dim: 10"):
        VQVAEConfig(architecture=arch, quantizer=dict(type="lfq"))


# ---------------------------------------------------------------------------------------------
# a tiny VQ-VAE of each family trains through the CLI


@pytest.mark.parametrize("name", ["simvq", "fsq", "lfq"])
def test_each_family_trains_through_the_cli(
    name, tmp_path, cli_in_process, tiny_tokenizer_recipe, write_yaml
):
    quantizer = {
        "simvq": dict(type="simvq", codebook_size=32),
        "fsq": dict(type="fsq", fsq_levels=[4, 4, 2], codebook_size=32, codebook_dim=3),
        "lfq": dict(type="lfq", codebook_size=32, codebook_dim=5),
    }[name]
    out = tmp_path / "run"
    recipe = tiny_tokenizer_recipe(out, train=dict(save_every=0, max_steps=8, learning_rate=3e-3))
    recipe["quantizer"] = quantizer  # the tiny recipe's VQ restarts mean nothing here
    cli_in_process("train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)))
    totals = [r["total"] for r in read_metrics(out, "train")]
    assert len(totals) == 8 and all(math.isfinite(t) for t in totals)
    assert sum(totals[-2:]) < sum(totals[:2])
    config = VQVAEConfig.from_pretrained(out / "final")
    assert config.quant.type == name and config.codebook_size == 32
