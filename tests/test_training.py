"""The harness both stages share: the one optimizer builder."""

from __future__ import annotations

from torch import nn

from vqgpt.tokenizer.vqvae import VQVAE, VQVAEConfig
from vqgpt.training import TrainConfig, build_optimizer

ARCH = dict(image_size=16, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4)


def test_both_stages_decay_matrices_and_kernels_only():
    model = VQVAE(VQVAEConfig(architecture=ARCH, quantizer=dict(preset="seed", codebook_size=8)))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, betas=(0.8, 0.9)))
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.8, 0.9)
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            assert id(module.weight) not in decayed and id(module.bias) not in decayed
        if isinstance(module, nn.Conv2d):
            assert id(module.weight) in decayed and id(module.bias) not in decayed
    assert id(model.quantizer.codebooks[0].embed) in decayed  # a gradient-trained codebook
    every = {id(p) for p in model.parameters()}
    assert decayed | {id(p) for p in no_decay["params"]} == every
    gan = build_optimizer(model.decoder, TrainConfig(), betas=(0.5, 0.9))
    assert gan.param_groups[0]["betas"] == (0.5, 0.9)
