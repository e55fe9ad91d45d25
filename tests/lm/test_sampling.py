"""The per-step logits pipeline: config checks, allowed-id masks, filters, guidance."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vqgpt.config import ConfigError, from_dict
from vqgpt.lm.sampling import SamplingConfig, guide, image_token_mask, text_token_mask, warp
from vqgpt.lm.vocab import VocabLayout

# a small text vocabulary: eos 99, boi 100, eoi 101, images 102..117; 128 logit columns
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
N_COLS = 128


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=0.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(cfg_scale=-1.0),
        dict(seed=-3),
        dict(max_new_tokens=0),
        dict(batch_size=0),
        dict(num_beams=0),
        dict(num_beams=3),  # with do_sample true
        dict(rerank=0),
    ],
)
def test_sampling_config_rejects(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)


def test_sampling_config_from_yaml_dict():
    cfg = from_dict(SamplingConfig, {"seed": None, "top_k": 5, "cfg_scale": 3}, "sampling")
    assert (cfg.seed, cfg.top_k, cfg.cfg_scale) == (None, 5, 3.0)
    with pytest.raises(ConfigError, match="sampling.topk"):
        from_dict(SamplingConfig, {"topk": 5}, "sampling")


def test_masks_split_the_vocabulary():
    image, text = image_token_mask(LAYOUT, N_COLS), text_token_mask(LAYOUT, N_COLS)
    assert image.nonzero().flatten().tolist() == list(range(102, 118))
    assert text.nonzero().flatten().tolist() == list(range(100))  # eos 99 in, boi/eoi out
    with pytest.raises(ValueError, match="resize"):
        image_token_mask(LAYOUT, 64)


def test_warp_top_k_and_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()
    kept = lambda cfg: torch.isfinite(warp(scores, cfg)).flatten().tolist()  # noqa: E731
    assert kept(SamplingConfig(top_k=2)) == [True, True, False, False]
    plain = SamplingConfig(temperature=1.0)  # top-p reads the probabilities after temperature
    assert kept(replace(plain, top_p=0.8)) == [True, True, False, False]  # 0.5 + 0.3 >= 0.8
    assert kept(replace(plain, top_p=0.81)) == [True, True, True, False]
    assert kept(replace(plain, top_p=0.1)) == [True, False, False, False]  # the top one stays
    tempered = warp(scores, SamplingConfig(temperature=2.0)).softmax(-1)
    assert torch.allclose(tempered, (probs.sqrt() / probs.sqrt().sum()))


def test_guide_formula_and_masking():
    allowed = torch.tensor([True, True, False])
    cond = torch.tensor([[-0.1, -2.4, float("-inf")]])
    uncond = torch.tensor([[-1.0, -0.5, float("-inf")]])
    out = guide(cond, uncond, 3.0, allowed)
    assert torch.allclose(out[0, :2], uncond[0, :2] + 3.0 * (cond[0, :2] - uncond[0, :2]))
    assert out[0, 2] == float("-inf")  # no nan from inf - inf
    assert torch.allclose(guide(cond, uncond, 1.0, allowed), cond)  # up to rounding
