"""Decoding loops: the dynamic and the static KV cache give the same tokens, the narrow head the
full head's logits, beam search what exhaustive scoring says, left padding what one row alone gets.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from vqgpt.lm.decoding import (
    KVDecoder,
    beam_search,
    decode_loop,
    last_logits,
    left_pad,
    narrow_head,
)
from vqgpt.lm.generate import ImageSampler, generate_captions, generate_image_codes
from vqgpt.lm.sampling import SamplingConfig, image_token_mask, text_token_mask
from vqgpt.lm.vocab import VocabLayout

# a small text vocabulary keeps the model tiny: eos 99, boi 100, eoi 101, images 102..117
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
N_COLS = 128  # LAYOUT.vocab_size (118) padded to a multiple of 64 (the tiny_gpt2 fixture)
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=10, cfg_scale=1.0)
CAPTIONS = [[5, 17, 3], [], [42], [7, 7, 7, 7, 7, 1]]
CASES = {
    "greedy": SamplingConfig(do_sample=False),
    "greedy-cfg": SamplingConfig(do_sample=False, cfg_scale=3.0),
    "sampled": SamplingConfig(seed=5),
    # batch_size 3 over 4 prompts: a second, smaller batch (a new static cache shape)
    "sampled-cfg-filters": SamplingConfig(
        seed=7, cfg_scale=2.5, temperature=0.8, top_k=6, top_p=0.9, batch_size=3
    ),
    # self-reranking: the same candidates, scored the same way, so the same choice
    "sampled-rerank": SamplingConfig(seed=3, cfg_scale=2.0, rerank=3),
}


@pytest.fixture(scope="module")
def model(tiny_gpt2) -> GPT2LMHeadModel:
    return tiny_gpt2(LAYOUT)


@pytest.mark.parametrize("name", list(CASES))
def test_static_cache_codes_equal_dynamic_cache_codes(model, name):
    sampling = CASES[name]
    want = generate_image_codes(model, LAYOUT, CAPTIONS, sampling)
    sampler = ImageSampler(model, LAYOUT, cache="static")
    assert not sampler.decoder.compiled  # CPU default: no compile
    got = sampler(CAPTIONS, sampling)
    assert got.shape == (len(CAPTIONS), *LAYOUT.grid)
    assert torch.equal(got, want)
    assert torch.equal(sampler(CAPTIONS, sampling), want)  # the reused cache starts clean


def test_static_cache_sampling_depends_on_seed_and_row(model):
    sampler = ImageSampler(model, LAYOUT, cache="static")
    a = sampler(CAPTIONS, SamplingConfig(seed=1))
    b = sampler(CAPTIONS, SamplingConfig(seed=2))
    assert not torch.equal(a, b)  # a seed-blind sampler would fail here
    # a row's codes depend on (seed, row index), not on the batch it ran in
    alone = sampler(CAPTIONS[:1], SamplingConfig(seed=1))
    assert torch.equal(alone[0], a[0])


def test_static_step_logits_track_the_dynamic_cache(model):
    """Step by step, the static cache's logits equal the DynamicCache's up to float rounding."""
    prompts = [[LAYOUT.eos_id, 5, 17, 3, LAYOUT.boi_id], [LAYOUT.eos_id, LAYOUT.boi_id]]
    steps = 6
    decoder = KVDecoder(model, cache="static")
    plain = KVDecoder(model, cache="dynamic")
    with torch.inference_mode():
        fast = decoder.start(prompts, LAYOUT.eos_id, steps)
        torch.testing.assert_close(
            fast, plain.start(prompts, LAYOUT.eos_id, steps), rtol=0, atol=1e-4
        )
        for t in range(steps - 1):
            tokens = torch.tensor([LAYOUT.image_offset + t, LAYOUT.image_offset + 2 * t])
            torch.testing.assert_close(decoder.step(tokens), plain.step(tokens), rtol=0, atol=1e-4)
    assert decoder.shape == (2, 5 + steps - 1)  # cache: prompt + every fed-back token


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=9, device=torch.device("cpu"))


def test_static_sampler_rejects_bad_prompts(model):
    sampler = ImageSampler(model, LAYOUT, cache="static")
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        sampler([[LAYOUT.boi_id]])
    with pytest.raises(ValueError, match="shorten the caption"):
        sampler([[1] * 40])
    with pytest.raises(ValueError, match="num_beams"):
        sampler([[1]], SamplingConfig(do_sample=False, num_beams=2))
    assert sampler([], SamplingConfig()).shape == (0, *LAYOUT.grid)


@pytest.mark.slow
def test_compiled_static_step_gives_the_same_codes(model):
    """torch.compile'd step (inductor on the CPU; CUDA graphs on a GPU): same codes. seconds with a warm inductor cache, ~30 s cold."""
    sampling = SamplingConfig(seed=3, cfg_scale=2.0)
    sampler = ImageSampler(model, LAYOUT, cache="static", compile=True)
    assert sampler.decoder.compiled
    got = sampler(CAPTIONS, sampling)
    assert torch.equal(got, generate_image_codes(model, LAYOUT, CAPTIONS, sampling))


def test_narrow_head_gives_the_full_heads_logits_on_its_columns(model):
    allowed = image_token_mask(LAYOUT, N_COLS)
    head = narrow_head(model, allowed)
    assert head is not None and torch.equal(head.columns, allowed.nonzero().squeeze(1))
    ids = torch.tensor([[LAYOUT.eos_id, 5, 6, LAYOUT.boi_id], [LAYOUT.eos_id, 9, 9, 9]])
    with torch.no_grad():
        full = last_logits(model, None, input_ids=ids)
        narrow = last_logits(model, head, input_ids=ids)
    assert full.shape == (2, N_COLS) and narrow.shape == (2, LAYOUT.codebook_size)
    torch.testing.assert_close(narrow, full[:, head.columns])
    # captions allow ~all columns: the full head is used (nothing to gain)
    assert narrow_head(model, text_token_mask(LAYOUT, N_COLS)) is None


def test_beam_search(model, boost_logits, constrained_score, image_prompt, random_codes):
    codes = random_codes(LAYOUT, 4, seed=7)
    prompts = [image_prompt(LAYOUT, c) for c in codes]
    allowed = text_token_mask(LAYOUT, N_COLS)
    eos = LAYOUT.eos_id
    steps = 8
    # make eos a plausible choice so hypotheses of different lengths compete
    eos_mask = torch.zeros(N_COLS, dtype=torch.bool)
    eos_mask[eos] = True
    handle = boost_logits(model, eos_mask, 3.0)
    try:
        decoder = KVDecoder(model)
        greedy = decode_loop(decoder, prompts, allowed, GREEDY, steps, pad_id=eos, stop_id=eos)
        one = beam_search(model, prompts, allowed, 1, steps, stop_id=eos, pad_id=eos)
        four = beam_search(model, prompts, allowed, 4, steps, stop_id=eos, pad_id=eos)
        for i, prompt in enumerate(prompts):
            tokens = greedy.tokens[i, : greedy.lengths[i]].tolist()
            assert one.sequences[i] == [t for t in tokens if t != eos]
            greedy_score = constrained_score(model, prompt, tokens, allowed)
            seq = four.sequences[i]
            full = seq if len(seq) == steps else [*seq, eos]
            beam_score = constrained_score(model, prompt, full, allowed)
            assert beam_score == pytest.approx(float(four.scores[i]), abs=1e-4)
            assert beam_score >= greedy_score - 1e-5
        assert any(len(s) < steps for s in four.sequences)  # some hypotheses did stop
        assert four.sequences != one.sequences  # the wider search found something else
        # generate_captions dispatches to it
        cfg = SamplingConfig(num_beams=4, do_sample=False, max_new_tokens=steps)
        assert generate_captions(model, LAYOUT, codes, cfg) == four.sequences
    finally:
        handle.remove()


def test_decoder_rejects_what_it_cannot_do(model):
    with pytest.raises(ValueError, match="cache must be one of"):
        KVDecoder(model, cache="paged")
    with pytest.raises(ValueError, match="compile needs cache='static'"):
        KVDecoder(model, cache="dynamic", compile=True)
    static = KVDecoder(model, cache="static")
    static.start([[LAYOUT.eos_id, LAYOUT.boi_id]], LAYOUT.eos_id, 2)
    with pytest.raises(ValueError, match="dynamic cache"):
        static.select(torch.tensor([0, 0]))
