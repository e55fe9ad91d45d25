"""Gradient estimators across the quantizer's non-differentiable nearest-code step.

Both map the encoder output `z` [N, d] to a tensor whose value is its code `q` [N, d] (the
quantizer's forward output) and choose what gradient reaches `z` from the gradient `g` at `q`:

- `straight_through` (van den Oord et al. 2017; Bengio et al. 2013): `z + sg[q - z]`, so
  dL/dz = g. The encoder never sees where in the cell it sits (the seed write-up's caveat).
- `rotation_trick` (Fifty et al., "Restructuring Vector Quantization with the Rotation Trick",
  ICLR 2025, Algorithm 1; lucidrains/vector-quantize-pytorch `rotate_to`): `sg[lambda R] z` with
  lambda = ||q|| / ||z|| and R the rotation that turns z's direction e = z/||z|| onto q's
  u = q/||q|| in the plane of the two. The forward value is lambda R z = q; the gradient is
  dL/dz = lambda R^T g: it keeps its angle to the code, and its size scales with ||q||/||z||.

  R is never built (O(d) per row, not d x d; its constants in float64). With r = (e + u) / ||e + u||,
      R = I - 2 r r^T + 2 u e^T,   so   R z = z - 2 r (r . z) + 2 u (e . z),
      R^T g = g - 2 r (r . g) + 2 e (u . g).
  Guards: where ||z|| < eps (or ||q|| < eps) lambda and e are undefined: that row falls back to
  the straight-through estimator. Where z points opposite its code (||e + u|| < eps), r is
  taken as 0 and R = I + 2 u e^T = I - 2 e e^T, the reflection that maps e onto u = -e; still
  orthogonal, still exact in the forward pass, and the limit of nothing else being defined.

Shapes: z and q are [N, d] float tensors (d >= 1); the result is [N, d] in z's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("ste", "rotation")
EPS = 1e-6  # norms below this count as zero (float32 inputs)


def straight_through(z: Tensor, q: Tensor) -> Tensor:
    """Value q, gradient to z unchanged: `z + (q - z).detach()` ([N, d] -> [N, d])."""
    return z + (q - z).detach()


def rotation_trick(z: Tensor, q: Tensor, eps: float = EPS) -> Tensor:
    """Value q (up to float rounding), gradient to z `lambda R^T g` (module docstring).

    Raises:
        ValueError: z and q differ in shape or are not [N, d].
    """
    if z.ndim != 2 or z.shape != q.shape:
        raise ValueError(
            f"rotation_trick needs z and q of one shape [N, d]; got {tuple(z.shape)} and "
            f"{tuple(q.shape)}"
        )
    with torch.no_grad():  # the constants, in float64: e + u nearly cancels near antiparallel
        z64, q64 = z.double(), q.double()
        z_norm = z64.norm(dim=1, keepdim=True)  # (N, 1)
        q_norm = q64.norm(dim=1, keepdim=True)  # (N, 1)
        ok = (z_norm > eps) & (q_norm > eps)  # (N, 1): rows the rotation is defined for
        e = z64 / z_norm.clamp(min=eps)  # (N, d) unit direction of z
        u = q64 / q_norm.clamp(min=eps)  # (N, d) unit direction of q
        s = e + u
        s_norm = s.norm(dim=1, keepdim=True)
        r = torch.where(s_norm > eps, s / s_norm.clamp(min=eps), torch.zeros_like(s))  # (N, d)
        scale = q_norm / z_norm.clamp(min=eps)  # lambda, (N, 1)
        e, u, r, scale = (t.to(z.dtype) for t in (e, u, r, scale))
    # lambda R z with lambda, r, u, e constants: the only gradient path is the linear one in z
    rz = z - 2 * r * (r * z).sum(dim=1, keepdim=True) + 2 * u * (e * z).sum(dim=1, keepdim=True)
    rotated = scale * rz
    # tiny float error aside, rotated == q: make the value exact, keep the gradient of `rotated`
    rotated = rotated + (q - rotated).detach()
    return torch.where(ok, rotated, straight_through(z, q))


def apply_estimator(name: str, z: Tensor, q: Tensor) -> Tensor:
    """`straight_through` ("ste") or `rotation_trick` ("rotation") of z [N, d] onto q [N, d].

    Raises:
        ValueError: an unknown estimator name.
    """
    if name == "ste":
        return straight_through(z, q)
    if name == "rotation":
        return rotation_trick(z, q)
    raise ValueError(f"unknown gradient estimator {name!r}; known: {list(ESTIMATORS)}")


__all__ = ["ESTIMATORS", "apply_estimator", "rotation_trick", "straight_through"]
