"""Muon on a model's hidden matrices and AdamW on everything else, as one optimizer.

Muon ("MomentUm Orthogonalized by Newton-Schulz"; K. Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/; the implementation is `torch.optim.Muon`) replaces
each 2-D hidden weight's momentum by the nearest semi-orthogonal matrix (five Newton-Schulz
iterations) before the update. It is meant for the hidden layers only: embeddings, the output
head, norms' gains and biases stay on AdamW (the reference recipe and modded-nanogpt's). The
learning rate is the AdamW one: `adjust_lr_fn="match_rms_adamw"` scales Muon's update of an
A x B matrix by 0.2 * sqrt(max(A, B)), so that its RMS matches AdamW's ("Muon is Scalable for LLM
Training", Liu et al. 2025, arXiv:2502.16982), and the same `train.learning_rate` and
`train.weight_decay` serve both halves.

torch's Muon runs its Newton-Schulz iterations in bfloat16. A CPU without native bf16 (no
AVX512-BF16 / AMX / arm64 BF16: `vqgpt.training.cpu_has_native_bf16`) only emulates bf16 matrix
products, ~170x slower than float32 on an AVX2 EPYC, so there `Muon` runs the same iterations in
float32 (`ns_dtype`): the same algorithm, a finer rounding.

`MuonWithAdamW` holds the two torch optimizers behind one `torch.optim.Optimizer`, so that one
LR schedule, Accelerate's `prepare`, gradient clipping and the checkpoints see a single optimizer:
its `param_groups` are the two optimizers' own group dicts (a scheduler that sets `lr` there sets
it for both), its `state_dict` holds both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MUON_LR_ADJUSTMENT = "match_rms_adamw"
NS_DTYPES = (torch.bfloat16, torch.float32)


def newton_schulz(
    g: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of `torch.optim.Muon` (K. Jordan's reference,
    github.com/KellerJordan/Muon) in `dtype`: an approximately semi-orthogonal matrix with the
    singular vectors of `g` [A, B] (its singular values roughly 0.5-1.5, not exactly 1: the
    coefficients trade exactness for speed), shape [A, B], dtype `dtype`. In bfloat16 it is
    torch's `_zeropower_via_newtonschulz`, operation for operation."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1 (out of place: `g` may be x itself)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix LR of an A x B matrix: "match_rms_adamw" 0.2 * sqrt(max(A, B)) * lr (Liu
    et al. 2025), "original" / None sqrt(max(1, A / B)) * lr (K. Jordan's); as torch.optim.Muon."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


# torch.optim.Muon exists from torch 2.9 (pyproject allows 2.4: build_optimizer refuses Muon there)
_TorchMuon: Any = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class Muon(_TorchMuon):
    """`torch.optim.Muon` with the dtype of its Newton-Schulz iterations as an argument:
    `ns_dtype=torch.bfloat16` is torch's own step; `torch.float32` runs the same update (momentum,
    Nesterov, decoupled weight decay, per-shape LR) with `newton_schulz` in float32, for CPUs that
    only emulate bf16. The state (one `momentum_buffer` per matrix) is torch's either way, so a
    checkpoint resumes under the other dtype.

    Raises:
        ValueError: `ns_dtype` is not bfloat16 or float32 (and torch's own checks).
    """

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {ns_dtype}")
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on `matrices`, AdamW on `adamw_groups`, stepped together.

    Args:
        matrices: 2-D parameters (hidden layers' weights; decayed by `weight_decay`).
        adamw_groups: AdamW parameter groups (each may set its own `weight_decay`).
        lr: the learning rate of both (Muon's scaled per matrix shape, see the module).
        weight_decay: Muon's decoupled weight decay.
        betas: AdamW's.
        momentum: Muon's (0.95, the reference's).
        ns_dtype: of Muon's Newton-Schulz iterations (`Muon`): bfloat16 (torch's), or float32 on
            a CPU without native bf16.

    Raises:
        ValueError: a parameter in `matrices` is not 2-D, or a parameter is in both.
    """

    def __init__(
        self,
        matrices: Sequence[torch.nn.Parameter],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        momentum: float = 0.95,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.muon = Muon(
            list(matrices),
            ns_dtype=ns_dtype,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr_fn=MUON_LR_ADJUSTMENT,
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas)
        # the base class checks that no parameter sits in two groups, and sets up its hooks
        super().__init__(
            [dict(g) for g in self.muon.param_groups + self.adamw.param_groups], {"lr": lr}
        )
        self._link_groups()

    def _link_groups(self) -> None:
        # the inner optimizers' own dicts: a scheduler writing `lr` here writes it there
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link_groups()  # loading replaced the inner group dicts


__all__ = [
    "MUON_LR_ADJUSTMENT",
    "NS_DTYPES",
    "Muon",
    "MuonWithAdamW",
    "adjusted_lr",
    "newton_schulz",
]
