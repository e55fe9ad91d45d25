"""The VQVAE model: shapes, factors, save/load round trip, gradients through the straight-through path."""

import pytest
import torch

from vqgpt.config import ConfigError
from vqgpt.tokenizer.quantize import QuantizerConfig
from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig


def tiny(**arch) -> VQVAE:
    torch.manual_seed(0)
    model = dict(image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8, norm_groups=4)
    model.update(arch)
    return VQVAE(VQVAEConfig.build(ModelConfig(**model), QuantizerConfig(codebook_size=16)))


@pytest.mark.parametrize(
    "arch,grid",
    [
        (dict(stem_stride=1, channel_mult=(1, 2, 2)), (8, 8)),  # f = 4
        (dict(stem_stride=2, channel_mult=(1, 2, 2)), (4, 4)),  # f = 8
        (dict(stem_stride=2, channel_mult=(1, 1, 2, 2), attention=True), (2, 2)),  # f = 16
        (dict(stem_stride=2, channel_mult=(1, 2, 2), norm_out=False), (4, 4)),
        (dict(stem_stride=2, channel_mult=(1, 2, 2), local_encoder=True), (4, 4)),
        (dict(stem_stride=1, channel_mult=(1, 2), local_encoder=True), (16, 16)),  # f = 2
    ],
)
def test_encode_decode_shapes(arch, grid):
    model = tiny(**arch).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(pixels)
    assert codes.shape == (2, *grid) and codes.dtype == torch.long
    assert model.grid == grid
    out = model.decode(codes)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_forward_gradients_reach_encoder_through_straight_through():
    model = tiny().train()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(pixels)
    ((out.reconstruction - pixels) ** 2).mean().backward()
    enc_grad = model.encoder.layers[0].weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    model = tiny().train()
    model(torch.rand(4, 3, 32, 32) * 2 - 1)  # k-means init + EMA update change buffers
    model.eval()
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = VQVAE.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.encode(pixels), model.encode(pixels))
    assert torch.allclose(loaded.decode(model.encode(pixels)), model.decode(model.encode(pixels)))
    assert loaded.config.quant == model.config.quant


def test_norm_out_false_drops_the_two_output_norms_and_round_trips(tmp_path):
    """norm_out: the GroupNorm before the encoder's last conv and the decoder's output conv
    (taming's `norm_out`); a config.json without the key (before 2026-12-06) keeps both."""

    def norms(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.GroupNorm) for x in m.modules())

    with_norms, without = tiny(), tiny(norm_out=False)
    assert norms(with_norms.encoder) - norms(without.encoder) == 1
    assert norms(with_norms.decoder) - norms(without.decoder) == 1
    assert not isinstance(without.decoder.layers[-2], torch.nn.GroupNorm)
    without.save_pretrained(tmp_path / "new")
    loaded = VQVAE.from_pretrained(tmp_path / "new")
    assert loaded.config.arch.norm_out is False and norms(loaded) == norms(without)
    with_norms.config.architecture.pop("norm_out")  # an older run's config.json
    with_norms.save_pretrained(tmp_path / "old")
    assert VQVAE.from_pretrained(tmp_path / "old").config.arch.norm_out is True


def _cell_inputs(model: VQVAE, cell: tuple[int, int], side: int) -> torch.Tensor:
    """[side, side] bool: the pixels whose change moves z_e at `cell` (its gradient's support),
    over random images (one image could leave a pixel at zero gradient by chance)."""
    pixels = (torch.rand(2, 3, side, side) * 2 - 1).requires_grad_(True)
    model.encoder(pixels)[:, :, cell[0], cell[1]].sum().backward()
    return pixels.grad.abs().sum((0, 1)) > 0


@pytest.mark.parametrize(
    "channel_mult,field",
    [((1, 2, 2), 24), ((1, 1, 2, 2), 56)],  # f = 8: 24 x 24 pixels; f = 16: 56 x 56
)
def test_the_local_encoder_sees_its_own_patch_and_about_one_cell_around_it(channel_mult, field):
    """model.local_encoder: a code's input is its f x f patch and about one cell around it (the
    receptive field worked out by hand for a stride-2 stem), and no statistic of the image (no
    GroupNorm in the encoder); taming's default sees every pixel."""
    side = 64
    local = tiny(local_encoder=True, image_size=side, channel_mult=channel_mult)
    default = tiny(image_size=side, channel_mult=channel_mult)
    f = local.config.arch.downsample_factor
    cell = (side // f // 2, side // f // 2)
    seen = _cell_inputs(local, cell, side)
    rows, cols = seen.nonzero().unbind(1)
    lo, hi = cell[0] * f, cell[0] * f + f  # the cell's own pixels [lo, hi) (square cells)
    assert seen[lo:hi, lo:hi].all()
    for pos in (rows, cols):
        assert pos.max() - pos.min() + 1 == field  # the patch and 16 / 40 pixels around it
    assert seen.sum() == field * field
    assert _cell_inputs(default, cell, side).all()  # the default: every pixel of the image
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in local.encoder.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in local.decoder.modules())  # unchanged
    # pixels out of the field change nothing, through convolutions or norms: z_e as codes
    local.eval()
    pixels = torch.rand(1, 3, side, side) * 2 - 1
    moved = pixels.clone()
    top = int(rows.min())  # every row above the field redrawn
    moved[..., :top, :] = torch.rand_like(moved[..., :top, :]) * 2 - 1
    assert torch.equal(
        local.encoder(moved)[..., cell[0] :, :], local.encoder(pixels)[..., cell[0] :, :]
    )
    assert torch.equal(local.encode(moved)[:, cell[0] :], local.encode(pixels)[:, cell[0] :])
    assert not torch.equal(
        default.encoder(moved)[..., cell[0], :], default.encoder(pixels)[..., cell[0], :]
    )


def test_local_encoder_round_trips_and_older_configs_read_as_taming(tmp_path):
    model = tiny(local_encoder=True)
    model.save_pretrained(tmp_path / "new")
    loaded = VQVAE.from_pretrained(tmp_path / "new").eval()
    assert loaded.config.arch.local_encoder is True
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(pixels), model.eval().encode(pixels))
    old = tiny()
    old.config.architecture.pop("local_encoder")  # a config.json from before 2026-12-07
    old.save_pretrained(tmp_path / "old")
    assert VQVAE.from_pretrained(tmp_path / "old").config.arch.local_encoder is False
    with pytest.raises(ConfigError, match="local_encoder and model.attention"):
        ModelConfig(local_encoder=True, attention=True)


def test_bad_input_shapes_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(3, 32, 32))


def test_bad_architecture_is_a_config_error():
    from vqgpt.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(image_size=36, stem_stride=2, channel_mult=(1, 2, 2))


def test_bypassed_quantizer_decodes_z_e_and_defers_kmeans_init():
    model = tiny().train()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(pixels, bypass_quantizer=True)
    assert torch.allclose(out.reconstruction, model.decoder(model.encoder(pixels)))
    assert not bool(model.quantizer.codebooks[0].initialized)  # k-means waits for real codes
    model(pixels)
    assert bool(model.quantizer.codebooks[0].initialized)


FACTORISED = {
    "vq-l2": dict(codebook_dim=4, l2_normalize=True),
    "simvq": dict(type="simvq", codebook_dim=4),
    "fsq": dict(type="fsq", fsq_levels=[4, 4], codebook_dim=2),
    "lfq": dict(type="lfq", codebook_dim=4),
}


@pytest.mark.parametrize("name", list(FACTORISED))
def test_the_warm_up_trains_the_factorised_projections(name):
    """Issue 15 item 3: a warm-up that decoded z_e itself left proj_in / proj_out at their random
    init, so the first real step fed the decoder vectors it had never seen (factorised l2 codes
    then collapsed within ~50 steps). The bypass now runs the quantizer's path without the
    snapping: the projections get gradients, and the decoder input is what the codes approximate."""
    torch.manual_seed(0)
    model = dict(image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8, norm_groups=4)
    quantizer = QuantizerConfig(codebook_size=16, **FACTORISED[name])
    vqvae = VQVAE(VQVAEConfig.build(ModelConfig(**model), quantizer)).train()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    out = vqvae(pixels, bypass_quantizer=True)
    z_e = vqvae.encoder(pixels)
    assert out.quantizer.quantized.shape == z_e.shape
    assert not torch.allclose(out.quantizer.quantized, z_e)  # through the projections
    (out.reconstruction - pixels).pow(2).mean().backward()
    q = vqvae.quantizer
    for proj in (q.proj_in, q.proj_out):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # the training loop drops the gradients of `unused_in_bypass()` in bypass steps: the
    # projections are not among them (tokenizer/test_train.py checks the loop itself)
    unused = vqvae.unused_in_bypass()
    assert not {id(p) for p in unused} & {
        id(p) for m in (q.proj_in, q.proj_out) for p in m.parameters()
    }
    assert all(p.grad is None or not p.grad.any() for p in unused)
    if name == "vq-l2":  # unit vectors in search space; the codebook still waits for k-means
        z = torch.nn.functional.linear(z_e.permute(0, 2, 3, 1), q.proj_in.weight, q.proj_in.bias)
        z = torch.nn.functional.normalize(z, dim=-1)
        want = torch.nn.functional.linear(z, q.proj_out.weight, q.proj_out.bias)
        assert torch.allclose(out.quantizer.quantized, want.permute(0, 3, 1, 2), atol=1e-6)
        assert not bool(q.codebooks[0].initialized)


def test_a_seeded_encoder_and_decoder_do_not_depend_on_the_quantizer():
    """Runs that differ only in the quantizer start from the same encoder and decoder (the bench's
    vqgpt and peer rows are paired); the quantizers themselves still differ."""
    model = dict(image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8, norm_groups=4)
    built = []
    for quantizer in (QuantizerConfig(codebook_size=16), *map(
        lambda kw: QuantizerConfig(codebook_size=16, **kw), FACTORISED.values()
    )):  # fmt: skip
        torch.manual_seed(0)
        built.append(VQVAE(VQVAEConfig.build(ModelConfig(**model), quantizer)))
    first = built[0]
    for other in built[1:]:
        for part in ("encoder", "decoder"):
            a, b = getattr(first, part).state_dict(), getattr(other, part).state_dict()
            assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(built[0].quantizer.codebook, built[1].quantizer.codebook)


def test_code_vectors_are_what_the_decoder_reads():
    model = tiny().eval()
    vectors = model.code_vectors()
    assert vectors.shape == (16, 8) and vectors.dtype == torch.float32
    ids = torch.randint(0, 16, (2, 4, 4))
    torch.testing.assert_close(model.quantizer.lookup(ids), vectors[ids].permute(0, 3, 1, 2))
    model.quantizer.codebooks[0].embed.data += 1.0  # follows the codebook as it is now
    torch.testing.assert_close(model.code_vectors(), vectors + 1.0)


def test_code_vectors_refuse_residual_codes():
    model = dict(image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8, norm_groups=4)
    quantizer = QuantizerConfig(codebook_size=16, num_quantizers=2)
    residual = VQVAE(VQVAEConfig.build(ModelConfig(**model), quantizer))
    with pytest.raises(ValueError, match="residual"):
        residual.code_vectors()
