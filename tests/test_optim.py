"""`train.optimizer=muon`: Muon on the LM's hidden matrices, AdamW on the rest, one optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from vqgpt.config import ConfigError
from vqgpt.lm.model import LMConfig, build_lm, hidden_matrices
from vqgpt.optim import MuonWithAdamW, newton_schulz
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


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16)])
def test_newton_schulz_in_bf16_is_torchs_iteration_and_float32_rounds_finer(shape):
    reference = getattr(torch.optim._muon, "_zeropower_via_newtonschulz", None)
    if reference is None:
        pytest.skip("this torch has no torch.optim._muon._zeropower_via_newtonschulz")
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.0
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    ours = newton_schulz(g, *args, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference(g, *args))
    f32 = newton_schulz(g, *args, dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.shape == g.shape
    # the same iteration: bf16's result is f32's rounded along the way (a few 1e-2 at most)
    assert (ours.float() - f32).abs().max() < 0.05
    # and it orthogonalises: singular values near 1, where g's spread
    s = torch.linalg.svdvals(f32)
    assert s.min() > 0.6 and s.max() < 1.3


def muon_of(model: torch.nn.Module, ns_dtype: torch.dtype) -> MuonWithAdamW:
    matrices = hidden_matrices(model)
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return MuonWithAdamW(
        matrices,
        [{"params": rest}],
        lr=2e-3,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        ns_dtype=ns_dtype,
    )


def test_float32_muon_is_torchs_update_with_float32_newton_schulz(monkeypatch):
    """The float32 path (CPUs without native bf16) is torch's step (momentum, Nesterov, weight
    decay, per-shape LR) with only the Newton-Schulz dtype changed: bit for bit torch's own step
    with its iteration swapped for `newton_schulz` in float32, and near torch's bf16 step."""
    import torch.optim._muon as torch_muon

    def run(dtype: torch.dtype, steps: int) -> tuple[list[torch.Tensor], dict]:
        model = tiny_lm()
        opt = muon_of(model, dtype)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randint(0, 300, (2, 16), generator=g)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in hidden_matrices(model)], opt.state_dict()

    start = [p.detach().clone() for p in hidden_matrices(tiny_lm())]
    ours, _ = run(torch.float32, 3)
    bf16_one, bf16_state = run(torch.bfloat16, 1)
    f32_one, _ = run(torch.float32, 1)
    for a, b, s in zip(bf16_one, f32_one, start, strict=True):
        assert not torch.equal(a, b)  # another rounding ...
        cosine = torch.nn.functional.cosine_similarity((a - s).flatten(), (b - s).flatten(), dim=0)
        assert cosine > 0.95  # ... of the same update (bf16 moves its singular values ~0.1-0.2)
    with monkeypatch.context() as m:
        swap = lambda g, c, n, e: newton_schulz(g, c, n, e, torch.float32)  # noqa: E731
        m.setattr(torch_muon, "_zeropower_via_newtonschulz", swap)
        torchs, _ = run(torch.bfloat16, 3)  # torch's own step, its iteration in float32
    for a, b in zip(ours, torchs, strict=True):
        assert torch.equal(a, b)
    # torch's state loads into the float32 Muon (the same keys: one momentum_buffer a matrix)
    opt = muon_of(tiny_lm(), torch.float32)
    opt.load_state_dict(bf16_state)
    assert opt.muon.ns_dtype == torch.float32
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        muon_of(tiny_lm(), torch.float16)


def test_muon_iterates_in_float32_where_the_cpu_only_emulates_bf16(monkeypatch):
    import vqgpt.training as training

    model = tiny_lm()
    build = lambda: build_optimizer(model, muon_config(), matrices=hidden_matrices(model))  # noqa: E731
    monkeypatch.setattr(training, "trains_on_cpu", lambda: True)
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert build().muon.ns_dtype == torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert build().muon.ns_dtype == torch.float32
    monkeypatch.setenv(training.CPU_BF16_ENV, "1")  # keep bf16 anyway
    assert build().muon.ns_dtype == torch.bfloat16
    monkeypatch.delenv(training.CPU_BF16_ENV)
    monkeypatch.setattr(training, "trains_on_cpu", lambda: False)  # a GPU run
    assert build().muon.ns_dtype == torch.bfloat16
