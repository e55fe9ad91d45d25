"""`train.optimizer=muon`: Muon on the LM's hidden matrices, AdamW on the rest, one optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from vqgpt.config import ConfigError
from vqgpt.lm.model import LMConfig, build_lm, hidden_matrices
from vqgpt.optim import MuonWithAdamW
from vqgpt.training import TrainConfig, build_optimizer, warmup_cosine


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_lm(LMConfig(preset="tiny"), 300, 32)


def muon_config(**kw) -> TrainConfig:
    base = dict(
        optimizer="muon", learning_rate=2e-3, weight_decay=0.1, max_steps=10, warmup_steps=2
    )
    return TrainConfig(**{**base, **kw})


def train(model, optimizer, scheduler, steps: int, seed: int = 1, rows: int = 2) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 300, (rows, 16), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_hidden_matrices_are_the_blocks_2d_weights_and_every_parameter_is_in_one_half():
    model = tiny_lm()
    matrices = hidden_matrices(model)
    assert len(matrices) == 4 * len(model.transformer.h)
    assert all(p.ndim == 2 for p in matrices)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte and all(p is not wte for p in matrices)
    opt = build_optimizer(model, muon_config(), matrices=matrices)
    assert isinstance(opt, MuonWithAdamW)
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    adamw = [p for g in opt.adamw.param_groups for p in g["params"]]
    assert {id(p) for p in muon} == {id(p) for p in matrices}
    every = {id(p) for p in model.parameters()}
    assert {id(p) for p in muon} | {id(p) for p in adamw} == every
    assert len(muon) + len(adamw) == len(every)  # none twice
    # AdamW's halves keep the decay rule: the embeddings decayed, norms and biases not
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.adamw.param_groups}
    assert id(wte) in decay[0.1] and id(model.transformer.ln_f.weight) in decay[0.0]


def test_the_schedule_sets_both_halves_and_muon_orthogonalises_the_matrices_updates():
    model = tiny_lm()
    tc = muon_config(weight_decay=0.0)
    opt = build_optimizer(model, tc, matrices=hidden_matrices(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc))
    w = model.transformer.h[0].mlp.c_fc.weight  # 64 x 256 (Conv1D: in x out)
    before = w.detach().clone()
    gradients = []
    w.register_post_accumulate_grad_hook(lambda p: gradients.append(p.grad.detach().clone()))
    train(model, opt, scheduler, 1, rows=8)  # 128 tokens: a gradient of full rank 64
    lrs = {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups}
    assert lrs == {tc.learning_rate}  # warm-up step 2 of 2, set in both optimizers
    # the first update, undone of its step size (warm-up 1/2, match_rms_adamw's 0.2 sqrt(256)),
    # is the orthogonalised gradient: its leading singular values sit near 1 and close together
    # (Newton-Schulz's quintic leaves them in ~[0.7, 1.2]) where the gradient's spread 4x
    step = (before - w.detach()) / (0.5 * tc.learning_rate * 0.2 * max(w.shape) ** 0.5)
    s = torch.linalg.svdvals(step.float())[:32]
    g = torch.linalg.svdvals(gradients[0].float())[:32]
    assert 0.7 < float(s.min()) and float(s.max()) < 1.3, s
    assert float(s[0] / s[-1]) < 1.5 and float(g[0] / g[-1]) > 3, (s, g)


def test_a_restored_state_continues_as_the_uninterrupted_run_bit_for_bit():
    tc = muon_config()
    model = tiny_lm()
    opt = build_optimizer(model, tc, matrices=hidden_matrices(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc))
    train(model, opt, scheduler, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scheduler.state_dict()))
    reference = train(model, opt, scheduler, 3, seed=2)

    other = tiny_lm()
    other.load_state_dict(saved[0])
    opt2 = build_optimizer(other, tc, matrices=hidden_matrices(other))
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, warmup_cosine(tc))
    opt2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    assert opt2.param_groups[0] is opt2.muon.param_groups[0]  # relinked after the load
    assert train(other, opt2, scheduler2, 3, seed=2) == reference
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_muon_without_hidden_matrices_or_under_sharding_is_refused(monkeypatch):
    model = tiny_lm()
    with pytest.raises(ConfigError, match="train.optimizer=muon is for the LM"):
        build_optimizer(model, muon_config())  # the tokenizer passes none
    with monkeypatch.context() as m:  # a torch before 2.9, which pyproject allows
        m.delattr(torch.optim, "Muon")
        with pytest.raises(ConfigError, match=r"needs torch >= 2.9 \(torch.optim.Muon\)"):
            build_optimizer(model, muon_config(), matrices=hidden_matrices(model))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="needs each matrix whole"):
        build_optimizer(model, muon_config(), matrices=hidden_matrices(model))
    with pytest.raises(ConfigError, match="train.optimizer='sgd': use one of adamw, muon"):
        TrainConfig(optimizer="sgd")
