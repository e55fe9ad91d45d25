"""What vqgpt keeps beside the exported code is held to it, field by field.

`vqgpt/export/hub/` is the one implementation of what an export ships; vqgpt imports its blocks,
search, lookup, preprocessing, token layout and t2i prefix. What must differ lives in vqgpt: the
validated configs (ModelConfig, QuantizerConfig), the training quantizer (EMA and restart state)
and the full VocabLayout. These tests pin them to the hub's copies.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from vqgpt.config import to_dict
from vqgpt.export.hub import configuration_vqgpt as hub_config
from vqgpt.export.hub import modeling_vqgpt as hub_model
from vqgpt.export.hub.processing_vqgpt import TokenLayout
from vqgpt.lm.vocab import VocabLayout
from vqgpt.tokenizer.quantize import QuantizerConfig
from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig

QUANTIZERS = {
    "default": dict(codebook_size=24),
    "seed": dict(preset="seed", codebook_size=24),
    "factorised-l2": dict(codebook_size=24, codebook_dim=4, l2_normalize=True),
    "residual": dict(codebook_size=24, num_quantizers=3),
    "simvq": dict(type="simvq", codebook_size=24),
    "fsq": dict(type="fsq", fsq_levels=[3, 4, 2], codebook_size=24, codebook_dim=3),
    "lfq": dict(type="lfq", codebook_size=16, codebook_dim=4),
}
ARCH = dict(image_size=16, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4)


def test_architecture_defaults_are_the_hubs():
    assert to_dict(ModelConfig()) == hub_config.ARCHITECTURE_DEFAULTS


def test_quantizer_fields_the_hub_reads_have_the_hubs_defaults():
    package = to_dict(QuantizerConfig())
    for key, value in hub_config.QUANTIZER_DEFAULTS.items():
        assert package[key] == value, key


def test_vqgpt_config_is_the_hub_config_validated():
    config = VQVAEConfig(architecture=ARCH, quantizer=QUANTIZERS["residual"])
    assert isinstance(config, hub_config.VQVAEConfig)
    hub = hub_config.VQVAEConfig(architecture=ARCH, quantizer=QUANTIZERS["residual"])
    assert (config.grid, config.downsample_factor, config.codebook_size) == (
        hub.grid,
        hub.downsample_factor,
        hub.codebook_size,
    )
    assert config.arch.grid == config.grid and config.arch.downsample_factor == 4


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_training_model_state_is_the_hub_models_plus_training_buffers(tmp_path, name):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(architecture=ARCH, quantizer=QUANTIZERS[name])).eval()
    model.save_pretrained(tmp_path)
    hub = hub_model.VQVAE.from_pretrained(tmp_path).eval()
    ours, theirs = model.state_dict(), hub.state_dict()
    extra = set(ours) - set(theirs)
    ignored = hub_model.VQVAE._keys_to_ignore_on_load_unexpected
    assert set(theirs) <= set(ours)
    assert all(any(re.search(p, k) for p in ignored) for k in extra), extra
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(pixels)
    assert torch.equal(hub.encode(pixels), codes)
    assert torch.equal(hub.decode(codes), model.decode(codes))


def test_vocab_layout_is_the_hubs_token_layout_plus_checks():
    assert issubclass(VocabLayout, TokenLayout)
    ours = [(f.name, f.default) for f in dataclasses.fields(VocabLayout)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(TokenLayout)]
    assert ours == theirs  # no field of its own: vqgpt_vocab.json is read the same way by both
    layout = VocabLayout(codebook_size=1024, grid=[8, 8])
    hub = TokenLayout(**layout.to_dict())
    ids = ("eos_id", "boi_id", "eoi_id", "image_offset", "vocab_size", "tokens_per_image", "grid")
    assert [getattr(layout, k) for k in ids] == [getattr(hub, k) for k in ids]
    assert (layout.eos_id, layout.boi_id, layout.image_offset) == (50256, 50257, 50259)
