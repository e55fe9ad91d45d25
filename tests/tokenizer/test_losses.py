"""Stage-one losses: config validation, term values, GAN schedule, adaptive weight, LPIPS file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vqgpt.config import ConfigError, from_dict
from vqgpt.tokenizer.losses import (
    LPIPS,
    LPIPS_KEYS,
    LossConfig,
    PatchDiscriminator,
    VQLoss,
    adaptive_weight,
    convert_lpips_weights,
    hinge_d_loss,
    hinge_g_loss,
    load_lpips,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _gan_cfg(**kw) -> LossConfig:
    return LossConfig(
        adversarial_weight=0.5, discriminator_channels=8, discriminator_layers=2, **kw
    )


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"l1_weight": -1.0}, "loss.l1_weight"),
        ({"adversarial_weight": float("nan")}, "loss.adversarial_weight"),
        ({"l1_weight": 0.0}, "all 0"),
        ({"perceptual_weight": 1.0}, "loss.perceptual_weights_path"),
        ({"adversarial_start_step": -3}, "loss.adversarial_start_step"),
        ({"discriminator_layers": 0}, "loss.discriminator_layers"),
    ],
)
def test_config_rejects_bad_values(data, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        from_dict(LossConfig, data, "loss")


def test_config_from_dict_and_unknown_key() -> None:
    cfg = from_dict(LossConfig, {"l2_weight": 1, "adversarial_start_step": 100}, "loss")
    assert cfg.l2_weight == 1.0 and cfg.adversarial_start_step == 100
    with pytest.raises(ConfigError, match="loss.l3_weight"):
        from_dict(LossConfig, {"l3_weight": 1.0}, "loss")


# ---------------------------------------------------------------------------------------------
# term values


def test_reconstruction_terms_and_total() -> None:
    loss = VQLoss(LossConfig(l1_weight=1.0, l2_weight=2.0))
    assert loss.discriminator is None and loss.perceptual is None
    pixels = torch.zeros(2, 3, 8, 8)
    recon = torch.full((2, 3, 8, 8), 0.5)
    recon[1] = -0.5  # |err| = 0.5 everywhere, err^2 = 0.25
    record = loss.autoencoder_loss(pixels, recon, torch.tensor(0.3), step=0, last_layer=None)
    assert record.parts["l1"].item() == pytest.approx(0.5)
    assert record.parts["l2"].item() == pytest.approx(0.25)
    assert record.parts["recon"].item() == pytest.approx(0.5 + 2 * 0.25)
    assert record.total.item() == pytest.approx(1.0 + 0.3)
    log = record.to_log("train/")
    assert log["train/total"] == pytest.approx(1.3) and log["train/generator"] == 0.0
    assert all(isinstance(v, float) for v in log.values())


def test_hinge_losses_on_hand_picked_logits() -> None:
    real = torch.tensor([2.0, 0.5])  # relu(1 - x): 0, 0.5 -> mean 0.25
    fake = torch.tensor([-2.0, 0.0])  # relu(1 + x): 0, 1   -> mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    # a confident, correct discriminator has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_discriminator_shape_groupnorm_and_min_size() -> None:
    disc = PatchDiscriminator(channels=8, layers=2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    assert disc(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32 // 4 - 2, 32 // 4 - 2)
    assert disc(torch.randn(2, 3, 12, 16)).shape == (2, 1, 1, 2)
    with pytest.raises(ValueError, match="at least 12x12"):
        disc(torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# adversarial schedule and adaptive weight


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(4, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(torch.relu(self.body(z))))


def test_generator_term_is_zero_before_start_step() -> None:
    loss = VQLoss(_gan_cfg(adversarial_start_step=10))
    calls = []
    loss.discriminator.register_forward_hook(lambda *_: calls.append(1))
    decoder = TinyDecoder()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = decoder(torch.randn(2, 4, 16, 16))
    q = torch.tensor(0.1)

    assert not loss.uses_discriminator(9) and loss.uses_discriminator(10)
    early = loss.autoencoder_loss(pixels, recon, q, step=9, last_layer=decoder.out.weight)
    assert calls == []  # D is not even run
    assert early.parts["generator"].item() == 0.0 and early.parts["adaptive_weight"].item() == 0.0
    assert early.total.item() == pytest.approx(early.parts["recon"].item() + 0.1)
    with pytest.raises(RuntimeError, match="uses_discriminator"):
        loss.discriminator_loss(pixels, recon, step=9)

    late = loss.autoencoder_loss(pixels, recon, q, step=10, last_layer=decoder.out.weight)
    assert calls == [1]
    assert late.parts["generator"].item() != 0.0
    expected = (
        late.parts["recon"] + 0.1 + 0.5 * late.parts["adaptive_weight"] * late.parts["generator"]
    )
    assert late.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_adaptive_weight_matches_gradient_ratio_and_trains() -> None:
    loss = VQLoss(_gan_cfg())
    decoder = TinyDecoder()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = decoder(torch.randn(2, 4, 16, 16))
    record = loss.autoencoder_loss(pixels, recon, torch.tensor(0.0), 0, decoder.out.weight)
    weight = record.parts["adaptive_weight"]
    assert torch.isfinite(weight) and 0.0 < weight.item() <= 1e4
    assert not weight.requires_grad

    rec = (pixels - recon).abs().mean()
    g = -loss.discriminator(recon).mean()
    (grad_rec,) = torch.autograd.grad(rec, decoder.out.weight, retain_graph=True)
    (grad_g,) = torch.autograd.grad(g, decoder.out.weight, retain_graph=True)
    manual = grad_rec.norm() / (grad_g.norm() + 1e-4)
    assert weight.item() == pytest.approx(manual.item(), rel=1e-4)

    record.total.backward()
    assert decoder.out.weight.grad is not None and decoder.out.weight.grad.abs().sum() > 0


def test_adaptive_weight_clamps_and_options() -> None:
    w = torch.ones(3, requires_grad=True)
    # the generator term barely depends on w: the ratio explodes and is clamped to 1e4
    assert adaptive_weight((w * 10).sum(), (w * 1e-9).sum(), w).item() == 1e4

    decoder = TinyDecoder()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    recon = decoder(torch.randn(1, 4, 16, 16))
    fixed = VQLoss(_gan_cfg(adaptive_weight=False))
    rec = fixed.autoencoder_loss(pixels, recon, torch.tensor(0.0), 0, last_layer=None)
    assert rec.parts["adaptive_weight"].item() == 1.0
    with pytest.raises(ValueError, match="last_layer"):
        VQLoss(_gan_cfg()).autoencoder_loss(pixels, recon, torch.tensor(0.0), 0, None)
    with torch.no_grad():  # evaluation: no graph, no adaptive weight, no error
        recon_eval = decoder(torch.randn(1, 4, 16, 16))
        rec = VQLoss(_gan_cfg()).autoencoder_loss(pixels, recon_eval, torch.tensor(0.0), 0, None)
    assert rec.parts["adaptive_weight"].item() == 0.0
    assert rec.total.item() == pytest.approx(rec.parts["recon"].item())


def test_discriminator_loss_trains_only_the_discriminator() -> None:
    loss = VQLoss(_gan_cfg())
    decoder = TinyDecoder()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = decoder(torch.randn(2, 4, 16, 16))
    record = loss.discriminator_loss(pixels, recon, step=0)
    assert set(record.parts) == {"disc", "logits_real", "logits_fake"}
    assert record.total.item() >= 0.0
    record.total.backward()
    assert decoder.out.weight.grad is None  # reconstruction was detached
    assert all(p.grad is not None for p in loss.discriminator.parameters())


# ---------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_sources(tmp_path_factory):
    """Fake torchvision vgg16 + lpips vgg.pth checkpoints (random values, real key layout)."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("lpips")
    net = LPIPS()
    vgg = {k: v.clone() for k, v in net.features.state_dict(prefix="features.").items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # dropped by the converter
    lins = {f"lin{j}.model.1.weight": lin.weight.abs().clone() for j, lin in enumerate(net.lins)}
    torch.save(vgg, root / "vgg16-397923af.pth")
    torch.save(lins, root / "vgg.pth")
    out = convert_lpips_weights(
        root / "vgg16-397923af.pth", root / "vgg.pth", root / "lpips.safetensors"
    )
    return root, vgg, lins, out


def test_convert_lpips_weights_layout(lpips_sources) -> None:
    _, vgg, lins, out = lpips_sources
    state = load_file(str(out))
    assert sorted(state) == sorted(LPIPS_KEYS) and len(LPIPS_KEYS) == 13 * 2 + 5
    assert torch.equal(state["features.28.bias"], vgg["features.28.bias"])
    assert torch.equal(state["lins.3.weight"], lins["lin3.model.1.weight"])
    assert state["lins.4.weight"].shape == (1, 512, 1, 1)


def test_perceptual_loss_runs_from_file(lpips_sources) -> None:
    _, _, _, out = lpips_sources
    cfg = LossConfig(l1_weight=1.0, perceptual_weight=0.5, perceptual_weights_path=str(out))
    loss = VQLoss(cfg)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    dist = loss.perceptual(a, b)
    assert dist.shape == (2,) and (dist > 0).all()
    assert loss.perceptual(a, a).abs().max().item() < 1e-6
    assert torch.allclose(loss.perceptual(b, a), dist, rtol=1e-4)
    record = loss.autoencoder_loss(a, b, torch.tensor(0.0), step=0)
    expected = record.parts["l1"] + 0.5 * record.parts["perceptual"]
    assert record.parts["recon"].item() == pytest.approx(expected.item(), rel=1e-6)
    record.total.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.perceptual.parameters())  # frozen metric
    loss.train()
    assert not loss.perceptual.training


def test_lpips_file_errors(tmp_path, lpips_sources) -> None:
    root = lpips_sources[0]
    with pytest.raises(FileNotFoundError, match="convert_lpips_weights"):
        VQLoss(LossConfig(perceptual_weight=1.0, perceptual_weights_path=str(tmp_path / "no.st")))
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path"):
        load_lpips(None)
    partial = tmp_path / "partial.safetensors"
    save_file({"lins.0.weight": torch.ones(1, 64, 1, 1)}, str(partial))
    with pytest.raises(ValueError, match="lacks .* expected key"):
        load_lpips(partial)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_lpips(garbage)
    torch.save({"lin0.weight": torch.ones(1)}, tmp_path / "bad_lins.pth")
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        convert_lpips_weights(
            root / "vgg16-397923af.pth", tmp_path / "bad_lins.pth", tmp_path / "x"
        )
