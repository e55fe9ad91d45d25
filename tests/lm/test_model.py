"""vqgpt.lm.model: building and resizing the GPT-2 for the joint vocabulary, its FLOP counts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from vqgpt.config import ConfigError, from_dict
from vqgpt.lm.model import (
    LMConfig,
    build_lm,
    flops_per_token,
    get_real_vocab_size,
    init_image_embeddings,
    peak_flops,
    resize_for_vocab,
)

IMAGE_OFFSET = 50257 + 2  # GPT-2 ids, then <|boi|>, <|eoi|>
CODEBOOK = 64
VOCAB = IMAGE_OFFSET + CODEBOOK  # 50323 -> padded to 50368


def tiny_gpt2(vocab_size: int, n_embd: int = 16, n_positions: int = 32, **kw) -> GPT2LMHeadModel:
    """A plain Hugging Face GPT-2, as a pretrained checkpoint would load."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=1, n_head=2, **kw
    )
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------
# config and building


def test_config_resolves_presets_and_overrides():
    assert LMConfig().architecture == (2, 2, 128)
    assert LMConfig(preset="small").architecture == (12, 12, 768)
    assert LMConfig(preset="medium").architecture == (24, 16, 1024)
    cfg = from_dict(LMConfig, {"preset": "mini", "n_layer": 6}, "model")
    assert cfg.architecture == (6, 4, 256)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(preset="huge"), "model.preset"),
        (dict(n_embd=100, n_head=3), "model.n_embd"),
        (dict(pretrained="gpt2", n_layer=4), "model.n_layer"),
        (dict(n_positions=0), "model.n_positions"),
        (dict(dropout=1.5), "model.dropout"),
        (dict(attn_implementation="magic"), "model.attn_implementation"),
        (dict(pad_vocab_to=0), "model.pad_vocab_to"),
        (dict(loss="half"), "model.loss"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LMConfig(**kwargs)


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_presets_build_and_forward(preset):
    torch.manual_seed(0)
    model = build_lm(LMConfig(preset=preset), VOCAB, n_positions=40)
    arch = LMConfig(preset=preset).architecture
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == arch
    assert model.config.vocab_size == 50368 and model.config.vocab_size % 64 == 0
    assert get_real_vocab_size(model.config) == VOCAB
    assert model.config.n_positions == 40
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (2, 40))
    logits = model(ids).logits
    assert logits.shape == (2, 40, 50368) and torch.isfinite(logits).all()


@pytest.mark.parametrize("preset, n_params", [("small", 124_439_808), ("medium", 354_823_168)])
def test_large_presets_match_gpt2_sizes(preset, n_params):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_lm(LMConfig(preset=preset, pad_vocab_to=1), 50257, n_positions=1024)
        logits = model(torch.zeros(1, 8, dtype=torch.long)).logits
    assert sum(p.numel() for p in model.parameters()) == n_params  # OpenAI's GPT-2 counts
    assert logits.shape == (1, 8, 50257)


def test_build_options_reach_the_model():
    cfg = LMConfig(dropout=0.1, attn_implementation="eager", n_positions=64, pad_vocab_to=128)
    model = build_lm(cfg, VOCAB, n_positions=40)
    assert model.config._attn_implementation == "eager"
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.1
    assert model.config.n_positions == 64  # the config's value wins over the caller's
    assert model.config.vocab_size == 50432  # a multiple of 128
    with pytest.raises(ConfigError, match="model.n_positions"):
        build_lm(LMConfig(n_positions=16), VOCAB, n_positions=40)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_lm(LMConfig(gradient_checkpointing=checkpointing), VOCAB, n_positions=12)
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------
# resizing


def test_resize_keeps_old_rows_and_draws_new_ones_like_them():
    n_old, n_embd = 2000, 16
    model = tiny_gpt2(n_old, n_embd=n_embd)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(n_embd, n_embd, generator=gen) * 0.3  # an anisotropic old distribution
    shift = torch.linspace(-1, 1, n_embd)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.randn(n_old, n_embd, generator=gen) @ mix + shift)
    old = model.transformer.wte.weight.detach().clone()

    resize_for_vocab(model, n_old + 4000, pad_to=64, generator=gen)
    weight = model.transformer.wte.weight
    assert weight.shape == (6016, n_embd) and weight.shape[0] % 64 == 0
    assert torch.equal(weight[:n_old], old)
    assert model.lm_head.weight is weight  # still tied
    assert model.config.vocab_size == 6016 and model.config.real_vocab_size == 6000

    new = weight[n_old:].detach()
    cov_old, cov_new = torch.cov(old.T), torch.cov(new.T)
    assert (new.mean(0) - old.mean(0)).abs().max() < 0.05
    assert torch.linalg.norm(cov_new - cov_old) / torch.linalg.norm(cov_old) < 0.1
    assert torch.unique(new, dim=0).shape[0] == new.shape[0]  # distinct rows: symmetry broken

    model(torch.tensor([[0, 5999, 10]])).logits.sum().backward()  # new rows are in the graph
    assert weight.grad[5999].abs().sum() > 0


def test_resize_is_deterministic_with_a_generator():
    rows = []
    for _ in range(2):
        model = resize_for_vocab(tiny_gpt2(100), 150, generator=torch.Generator().manual_seed(3))
        rows.append(model.transformer.wte.weight[100:].detach())
    assert torch.equal(rows[0], rows[1])


def test_resize_redraws_old_padding_and_refuses_to_shrink():
    model = tiny_gpt2(128)
    model.config.real_vocab_size = 90  # rows 90..127 are padding that never trained
    old = model.transformer.wte.weight.detach().clone()
    resize_for_vocab(model, 100)
    weight = model.transformer.wte.weight
    assert weight.shape[0] == 128
    assert torch.equal(weight[:90], old[:90])
    assert not torch.equal(weight[90:100], old[90:100])
    resized = weight.detach().clone()
    resize_for_vocab(model, 100)  # the same layout again changes nothing
    assert torch.equal(model.transformer.wte.weight, resized)
    with pytest.raises(ValueError, match="drop trained rows"):
        resize_for_vocab(model, 95)


def test_resize_untied_head_keeps_its_own_rows():
    model = tiny_gpt2(100, tie_word_embeddings=False)
    head_old = model.lm_head.weight.detach().clone()
    assert model.lm_head.weight is not model.transformer.wte.weight
    resize_for_vocab(model, 130)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.shape == (192, 16) and model.lm_head.out_features == 192
    assert torch.equal(model.lm_head.weight[:100], head_old)


def test_pretrained_path_extends_positions_and_vocab(tmp_path):
    base = tiny_gpt2(50257, n_positions=32)
    base.save_pretrained(tmp_path)
    wte, wpe = base.transformer.wte.weight.detach(), base.transformer.wpe.weight.detach()

    cfg = LMConfig(pretrained=str(tmp_path), dropout=0.1)
    model = build_lm(cfg, VOCAB, n_positions=80)
    assert model.config.resid_pdrop == 0.1 and model.config._attn_implementation == "sdpa"
    new_wpe = model.transformer.wpe.weight
    assert new_wpe.shape == (80, 16) and model.config.n_positions == 80
    assert torch.equal(new_wpe[:32], wpe)
    assert torch.equal(new_wpe[32:64], wpe) and torch.equal(new_wpe[64:], wpe[:16])  # copy init
    assert torch.equal(model.transformer.wte.weight[:50257], wte)
    assert model.config.vocab_size == 50368 and model.config.real_vocab_size == VOCAB
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(torch.randint(0, VOCAB, (1, 80))).logits.shape == (1, 80, 50368)

    # a saved resized model loads back tied, with its real vocabulary size
    model.save_pretrained(tmp_path / "resized")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "resized")
    assert get_real_vocab_size(again.config) == VOCAB
    assert again.lm_head.weight is again.transformer.wte.weight

    with pytest.raises(ConfigError, match="model.pretrained"):
        build_lm(LMConfig(pretrained=str(tmp_path / "missing")), VOCAB, n_positions=8)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_counts_the_parameters():
    model = build_lm(LMConfig(), VOCAB, n_positions=40)
    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    n_matmul = n_params - model.transformer.wpe.weight.numel()  # a lookup, no FLOPs
    arch = LMConfig().architecture
    expected = 6 * n_matmul + 12 * arch.n_layer * arch.n_embd * 40
    assert flops_per_token(model.config, 40) == expected
    assert flops_per_token(model.config, 80) - flops_per_token(model.config, 40) == (
        12 * arch.n_layer * arch.n_embd * 40
    )


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_table(monkeypatch, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == flops
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override=1e12) == 1e12


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    return x @ x.T


@pytest.mark.parametrize("code_dim", [8, 64])  # under and over the width (16): rotated, projected
def test_codebook_init_sets_image_rows_from_the_codes(code_dim):
    model = build_lm(LMConfig(preset="tiny", n_embd=16, n_head=2), VOCAB, n_positions=40)
    before = model.get_input_embeddings().weight.detach().clone()
    codes = torch.randn(CODEBOOK, code_dim, generator=torch.Generator().manual_seed(1)) * 3 + 1
    init_image_embeddings(model, codes, IMAGE_OFFSET, seed=0)
    after = model.get_input_embeddings().weight.detach()
    rows = after[IMAGE_OFFSET : IMAGE_OFFSET + CODEBOOK]
    assert rows.std().item() == pytest.approx(model.config.initializer_range, rel=1e-4)
    assert torch.equal(after[:IMAGE_OFFSET], before[:IMAGE_OFFSET])  # text rows untouched
    assert torch.equal(after[IMAGE_OFFSET + CODEBOOK :], before[IMAGE_OFFSET + CODEBOOK :])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    gram, ref = _centred_gram(rows), _centred_gram(codes)
    if code_dim <= 16:  # a rotation: the codes' inner products, up to one scale
        scale = (gram.trace() / ref.trace()).item()
        torch.testing.assert_close(
            gram, ref * scale, rtol=1e-4, atol=1e-4 * scale * ref.abs().max()
        )
    else:  # a random projection: nearest codes stay mostly nearest
        d_rows, d_ref = (
            torch.cdist(rows.double(), rows.double()),
            torch.cdist(codes.double(), codes.double()),
        )
        d_rows.fill_diagonal_(float("inf"))
        d_ref.fill_diagonal_(float("inf"))
        kept = torch.corrcoef(torch.stack([d_rows[d_rows.isfinite()], d_ref[d_ref.isfinite()]]))
        assert kept[0, 1] > 0.3  # distances correlate (a 64 -> 16 projection keeps ~1/2)
    again = build_lm(LMConfig(preset="tiny", n_embd=16, n_head=2), VOCAB, n_positions=40)
    init_image_embeddings(again, codes, IMAGE_OFFSET, seed=0)
    image_rows = slice(IMAGE_OFFSET, IMAGE_OFFSET + CODEBOOK)  # seeded: the same on every rank
    assert torch.equal(again.get_input_embeddings().weight[image_rows], after[image_rows])


def test_codebook_init_errors():
    model = build_lm(LMConfig(preset="tiny"), VOCAB, n_positions=40)
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="do not fit"):
        init_image_embeddings(model, torch.randn(CODEBOOK, 4), rows - 10)
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        init_image_embeddings(model, torch.randn(CODEBOOK), IMAGE_OFFSET)
    with pytest.raises(ConfigError, match="image_embedding_init"):
        LMConfig(image_embedding_init="pca")
