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

`MuonWithAdamW` holds the two torch optimizers behind one `torch.optim.Optimizer`, so that one
LR schedule, Accelerate's `prepare`, gradient clipping and the checkpoints see a single optimizer:
its `param_groups` are the two optimizers' own group dicts (a scheduler that sets `lr` there sets
it for both), its `state_dict` holds both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MUON_LR_ADJUSTMENT = "match_rms_adamw"


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on `matrices`, AdamW on `adamw_groups`, stepped together.

    Args:
        matrices: 2-D parameters (hidden layers' weights; decayed by `weight_decay`).
        adamw_groups: AdamW parameter groups (each may set its own `weight_decay`).
        lr: the learning rate of both (Muon's scaled per matrix shape, see the module).
        weight_decay: Muon's decoupled weight decay.
        betas: AdamW's.
        momentum: Muon's (0.95, the reference's).

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
    ) -> None:
        self.muon = torch.optim.Muon(
            list(matrices),
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


__all__ = ["MUON_LR_ADJUSTMENT", "MuonWithAdamW"]
