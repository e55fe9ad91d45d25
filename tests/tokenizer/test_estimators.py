"""The rotation trick against its explicit d x d matrix; the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from vqgpt.config import ConfigError
from vqgpt.tokenizer.estimators import apply_estimator, rotation_trick, straight_through
from vqgpt.tokenizer.quantize import QuantizerConfig, VectorQuantizer


def explicit_gradient(z: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """lambda R^T g per row, R built as a d x d matrix (Fifty et al. 2025, eq. 4), in float64."""
    rows = []
    for zi, qi, gi in zip(z.double(), q.double(), g.double(), strict=True):
        e, u = zi / zi.norm(), qi / qi.norm()
        s = e + u
        r = s / s.norm() if s.norm() > 1e-6 else torch.zeros_like(s)
        eye = torch.eye(len(zi), dtype=torch.float64)
        rot = eye - 2 * torch.outer(r, r) + 2 * torch.outer(u, e)
        rows.append(qi.norm() / zi.norm() * rot.T @ gi)
    return torch.stack(rows)


def gradient(fn, z: torch.Tensor, q: torch.Tensor, g: torch.Tensor):
    z = z.clone().requires_grad_(True)
    out = fn(z, q)
    (out * g).sum().backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("d", [1, 2, 3, 8, 64])
def test_rotation_forward_is_the_code_and_gradient_is_lambda_rt_g(d):
    gen = torch.Generator().manual_seed(d)
    z, q, g = (torch.randn(32, d, generator=gen) for _ in range(3))
    q = q * torch.rand(32, 1, generator=gen) * 3  # codes of other norms than the inputs
    out, grad = gradient(rotation_trick, z, q, g)
    torch.testing.assert_close(out, q, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad.double(), explicit_gradient(z, q, g), rtol=1e-4, atol=1e-5)
    # the rotation keeps the gradient's angle to the code: R^T maps u onto e
    assert not torch.allclose(grad, g)  # and it is not the straight-through gradient


def test_rotation_matrix_is_orthogonal_and_turns_z_onto_q():
    z, q = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    # d x d Jacobian of the map, columns = images of the basis vectors
    jac = torch.autograd.functional.jacobian(lambda x: rotation_trick(x, q), z)[0, :, 0, :]
    rot = jac * (3.0 / 2.0)  # divide by lambda = ||q|| / ||z||
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(rot @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))


def test_parallel_input_gives_the_straight_through_gradient_scaled():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 5, generator=gen)
    q, g = z.clone(), torch.randn(16, 5, generator=gen)  # the code is the input itself
    _, grad = gradient(rotation_trick, z, q, g)
    _, ste = gradient(straight_through, z, q, g)
    torch.testing.assert_close(grad, ste, rtol=1e-5, atol=1e-6)  # R = I, lambda = 1
    _, grad2 = gradient(rotation_trick, z, 2 * q, g)  # parallel, twice as long: lambda = 2
    torch.testing.assert_close(grad2, 2 * ste, rtol=1e-5, atol=1e-6)


def test_antiparallel_and_near_antiparallel_inputs_stay_finite_and_exact():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(8, 6, generator=gen)
    g = torch.randn(8, 6, generator=gen)
    for q in (-2 * z, -2 * z + 1e-4 * torch.randn(8, 6, generator=gen)):
        out, grad = gradient(rotation_trick, z, q, g)
        torch.testing.assert_close(out, q, rtol=0, atol=1e-5)
        assert torch.isfinite(grad).all()
        # still lambda times an orthogonal map: the gradient's norm is lambda * ||g||
        lam = q.norm(dim=1) / z.norm(dim=1)
        torch.testing.assert_close(grad.norm(dim=1), lam * g.norm(dim=1), rtol=1e-3, atol=1e-5)
    # exactly opposite: the reflection I - 2 e e^T
    exact = explicit_gradient(z, -2 * z, g)
    _, grad = gradient(rotation_trick, z, -2 * z, g)
    torch.testing.assert_close(grad.double(), exact, rtol=1e-4, atol=1e-5)


def test_zero_input_or_code_falls_back_to_straight_through():
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    g = torch.ones(3, 3)
    out, grad = gradient(rotation_trick, z, q, g)
    torch.testing.assert_close(out, q)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:2], g[:2])  # rows 0 and 1: straight-through
    assert not torch.allclose(grad[2], g[2])  # row 2: rotated


def test_quantizer_estimator_field_reaches_the_encoder_gradient():
    gen = torch.Generator().manual_seed(3)
    z_e = torch.randn(2, 4, 3, 3, generator=gen)
    grads = {}
    for name in ("ste", "rotation"):
        torch.manual_seed(0)
        vq = VectorQuantizer(4, QuantizerConfig(codebook_size=8, estimator=name, ema=False))
        vq.train()
        x = z_e.clone().requires_grad_(True)
        out = vq(x)
        (out.quantized * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
        grads[name] = (out.quantized.detach(), x.grad)
    torch.testing.assert_close(grads["ste"][0], grads["rotation"][0], rtol=0, atol=1e-6)
    assert not torch.allclose(grads["ste"][1], grads["rotation"][1])
    with pytest.raises(ConfigError, match="estimator"):
        QuantizerConfig(estimator="gumbel")
    with pytest.raises(ValueError, match="unknown gradient estimator"):
        apply_estimator("gumbel", z_e, z_e)
