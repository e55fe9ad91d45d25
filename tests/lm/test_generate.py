"""Decoding: constraints, KV cache vs recomputation, padding, seeds, CFG, beam search."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import GPT2LMHeadModel

from vqgpt.lm.decoding import KVDecoder, decode_loop, narrow_head
from vqgpt.lm.generate import (
    generate_captions,
    generate_image_codes,
    pair_logprobs,
    rerank_captions,
)
from vqgpt.lm.sampling import SamplingConfig, image_token_mask, text_token_mask
from vqgpt.lm.sequences import SequenceConfig, SequenceLengthError, build_t2i
from vqgpt.lm.vocab import VocabLayout

# a small text vocabulary keeps the model tiny: eos 99, boi 100, eoi 101, images 102..117
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
N_COLS = 128  # LAYOUT.vocab_size (118) padded to a multiple of 64 (the tiny_gpt2 fixture)
N_POSITIONS = 40  # the tiny_gpt2 fixture's default
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=10, cfg_scale=1.0)
CAPTIONS = [[5, 17, 3], [], [42], [7, 7, 7, 7, 7, 1]]


@pytest.fixture(scope="module")
def model(tiny_gpt2) -> GPT2LMHeadModel:
    return tiny_gpt2(LAYOUT)


# ---------------------------------------------------------------------------------------------
# text-to-image


def test_image_codes_obey_the_constraint_even_against_the_model(model, boost_logits):
    # make text, special and padded columns overwhelmingly likely: they must still never appear
    handle = boost_logits(model, ~image_token_mask(LAYOUT, N_COLS), 1e4)
    try:
        for cfg in (SamplingConfig(seed=3), GREEDY, SamplingConfig(cfg_scale=3.0, top_p=0.9)):
            codes = generate_image_codes(model, LAYOUT, CAPTIONS, cfg)
            assert codes.shape == (len(CAPTIONS), *LAYOUT.grid) and codes.dtype == torch.long
            assert int(codes.min()) >= 0 and int(codes.max()) < LAYOUT.codebook_size
    finally:
        handle.remove()


def test_image_cached_equals_uncached_reference(model, reference_greedy):
    allowed = torch.zeros(N_COLS, dtype=torch.bool)
    allowed[LAYOUT.image_offset : LAYOUT.vocab_size] = True
    codes = generate_image_codes(model, LAYOUT, CAPTIONS, GREEDY)
    for caption, got in zip(CAPTIONS, codes, strict=True):
        prompt = [LAYOUT.eos_id, *caption, LAYOUT.boi_id]
        ids = reference_greedy(model, prompt, allowed, LAYOUT.tokens_per_image)
        assert LAYOUT.codes_to_ids(got).flatten().tolist() == ids


def test_left_padded_batch_equals_one_by_one(model):
    batched = generate_image_codes(model, LAYOUT, CAPTIONS, GREEDY)
    singles = torch.cat([generate_image_codes(model, LAYOUT, [c], GREEDY) for c in CAPTIONS])
    assert torch.equal(batched, singles)
    # sampling: a row's tokens depend on the seed and its index, not on the batching
    cfg = SamplingConfig(seed=11, top_k=8)
    chunked = SamplingConfig(seed=11, top_k=8, batch_size=3)
    assert torch.equal(
        generate_image_codes(model, LAYOUT, CAPTIONS, cfg),
        generate_image_codes(model, LAYOUT, CAPTIONS, chunked),
    )


def test_seed_repeats_and_differs(model):
    prompts = [[5, 6]] * 4
    a = generate_image_codes(model, LAYOUT, prompts, SamplingConfig(seed=1))
    b = generate_image_codes(model, LAYOUT, prompts, SamplingConfig(seed=1))
    c = generate_image_codes(model, LAYOUT, prompts, SamplingConfig(seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.flatten().tolist()) for row in a}) > 1  # same prompt, own streams
    torch.manual_seed(0)
    d = generate_image_codes(model, LAYOUT, prompts, SamplingConfig(seed=None))
    torch.manual_seed(0)
    assert torch.equal(d, generate_image_codes(model, LAYOUT, prompts, SamplingConfig(seed=None)))


def test_top_k_one_is_greedy(model):
    top1 = SamplingConfig(top_k=1, seed=5, cfg_scale=1.0)
    sampled = generate_image_codes(model, LAYOUT, CAPTIONS, top1)
    assert torch.equal(sampled, generate_image_codes(model, LAYOUT, CAPTIONS, GREEDY))


def test_cfg_scale_one_is_plain_sampling_and_other_scales_differ(model):
    allowed = image_token_mask(LAYOUT, N_COLS)
    prompts = [[LAYOUT.eos_id, *c, LAYOUT.boi_id] for c in CAPTIONS]
    uncond = [[LAYOUT.eos_id, LAYOUT.boi_id]] * len(prompts)
    steps = LAYOUT.tokens_per_image
    for cfg in (GREEDY, SamplingConfig(seed=4, cfg_scale=1.0)):
        # the guided path with scale 1 (unconditional rows in the batch) == no guidance at all
        plain = generate_image_codes(model, LAYOUT, CAPTIONS, cfg)
        decoder = KVDecoder(model, head=narrow_head(model, allowed))  # as ImageSampler's
        forced = decode_loop(
            decoder, prompts, allowed, cfg, steps, pad_id=LAYOUT.eos_id, uncond_prompts=uncond
        )
        assert torch.equal(LAYOUT.ids_to_codes(forced.tokens).view_as(plain), plain)
        guided_cfg = SamplingConfig(cfg_scale=4.0, do_sample=cfg.do_sample, seed=cfg.seed)
        guided = generate_image_codes(model, LAYOUT, CAPTIONS, guided_cfg)
        assert guided.shape == plain.shape and not torch.equal(guided, plain)
    # scale 0: the caption is ignored, every row is the unconditional one
    zero = generate_image_codes(
        model, LAYOUT, CAPTIONS, SamplingConfig(cfg_scale=0.0, do_sample=False)
    )
    assert all(torch.equal(row, zero[0]) for row in zero)


def test_caption_logprobs_is_the_sum_of_constrained_caption_logprobs(
    model, constrained_score, image_prompt, random_codes
):
    codes = random_codes(LAYOUT, 3, seed=11)
    captions = [[5, 17, 3], [], [42, 42]]
    got = pair_logprobs(
        model, LAYOUT, codes, captions, batch_size=2, target="caption"
    )  # padded batches
    allowed = text_token_mask(LAYOUT, N_COLS)
    for i, (c, caption) in enumerate(zip(codes, captions, strict=True)):
        target = [*caption, LAYOUT.eos_id]
        want = constrained_score(model, image_prompt(LAYOUT, c), target, allowed) * len(target)
        assert got[i].item() == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="B captions"):
        pair_logprobs(model, LAYOUT, codes, captions[:2], target="caption")


def test_rerank_keeps_the_candidate_the_model_captions_best(model):
    prompts, n = [[5, 17, 3], [42]], 3
    sampling = SamplingConfig(seed=7, cfg_scale=2.0, temperature=1.0)
    best = generate_image_codes(model, LAYOUT, prompts, replace(sampling, rerank=n))
    rows = [p for p in prompts for _ in range(n)]
    candidates = generate_image_codes(model, LAYOUT, rows, sampling)  # the same seeded rows
    scores = pair_logprobs(model, LAYOUT, candidates, rows, target="caption").view(len(prompts), n)
    assert scores.std(dim=1).min() > 0  # the candidates differ, so the choice means something
    for i in range(len(prompts)):
        assert torch.equal(best[i], candidates[i * n + int(scores[i].argmax())])
    assert best.shape == (len(prompts), *LAYOUT.grid)
    assert generate_image_codes(model, LAYOUT, [], replace(sampling, rerank=n)).shape[0] == 0
    with pytest.raises(ValueError, match="needs sampling"):
        generate_image_codes(model, LAYOUT, prompts, SamplingConfig(do_sample=False, rerank=2))


def test_image_logprobs_is_the_sum_of_constrained_code_logprobs(
    model, constrained_score, random_codes
):
    codes = random_codes(LAYOUT, 2, seed=12)
    captions = [[5, 17, 3], []]
    got = pair_logprobs(model, LAYOUT, codes, captions, target="image")
    allowed = image_token_mask(LAYOUT, N_COLS)
    for i, (c, caption) in enumerate(zip(codes, captions, strict=True)):
        ids = LAYOUT.codes_to_ids(c).flatten().tolist()
        prompt = [LAYOUT.eos_id, *caption, LAYOUT.boi_id]  # no t2i_prefix_length: eos caption boi
        want = constrained_score(model, prompt, ids, allowed) * len(ids)
        assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_rerank_captions_keeps_the_best_noisy_channel_candidate(model, random_codes):
    codes, n = random_codes(LAYOUT, 3, seed=13), 4
    sampling = SamplingConfig(do_sample=False, rerank=n, max_new_tokens=6, seed=2)
    got = generate_captions(model, LAYOUT, codes, sampling)
    greedy = generate_captions(model, LAYOUT, codes, replace(sampling, rerank=1))
    drawn = replace(sampling, rerank=1, do_sample=True)
    more = generate_captions(model, LAYOUT, codes.repeat_interleave(n - 1, dim=0), drawn)
    for i in range(len(codes)):
        cands = [greedy[i], *more[i * (n - 1) : (i + 1) * (n - 1)]]
        pairs = codes[[i] * len(cands)]
        caption = pair_logprobs(model, LAYOUT, pairs, cands, target="caption")
        score = caption + pair_logprobs(model, LAYOUT, pairs, cands, target="image")
        assert got[i] == cands[int(score.argmax())]
    assert rerank_captions(model, LAYOUT, codes[:0], sampling) == []


def test_image_edge_cases(model):
    assert generate_image_codes(model, LAYOUT, [], GREEDY).shape == (0, *LAYOUT.grid)
    room = N_POSITIONS - LAYOUT.tokens_per_image - 4  # eos caption boi codes eoi eos
    generate_image_codes(model, LAYOUT, [[1] * room], GREEDY)  # fits exactly
    with pytest.raises(SequenceLengthError, match=f"n_positions={N_POSITIONS}.*at most {room}"):
        generate_image_codes(model, LAYOUT, [[1] * (room + 1)], GREEDY)
    with pytest.raises(ValueError, match="text vocabulary"):
        generate_image_codes(model, LAYOUT, [[LAYOUT.boi_id]], GREEDY)


def test_t2i_prefix_length_prompts_match_training_format(tiny_gpt2, reference_greedy):
    # a model trained with sequences.t2i_prefix_length decodes from the same left-padded prompt
    model = tiny_gpt2(LAYOUT, seed=3)
    model.config.t2i_prefix_length = 8
    allowed = image_token_mask(LAYOUT, N_COLS)
    codes = generate_image_codes(model, LAYOUT, CAPTIONS, GREEDY)
    for caption, got in zip(CAPTIONS, codes, strict=True):
        built = build_t2i(got, caption, LAYOUT, SequenceConfig(t2i_prefix_length=8))
        prompt = built.input_ids[: built.input_ids.index(LAYOUT.boi_id) + 1]
        assert len(prompt) == 9
        ids = reference_greedy(model, prompt, allowed, LAYOUT.tokens_per_image)
        assert LAYOUT.codes_to_ids(got).flatten().tolist() == ids
    # CFG's unconditional rows use the padded empty prompt too; scale 0 = all rows unconditional
    zero = generate_image_codes(
        model, LAYOUT, CAPTIONS[:1], SamplingConfig(cfg_scale=0.0, do_sample=False)
    )
    uncond = reference_greedy(model, [LAYOUT.eos_id] * 8 + [LAYOUT.boi_id], allowed, 9)
    assert LAYOUT.codes_to_ids(zero[0]).flatten().tolist() == uncond
    generate_image_codes(model, LAYOUT, [[1] * 7], GREEDY)  # fits exactly
    with pytest.raises(ValueError, match="t2i_prefix_length=8"):
        generate_image_codes(model, LAYOUT, [[1] * 8], GREEDY)


def test_training_mode_is_restored(tiny_gpt2):
    model = tiny_gpt2(LAYOUT)
    model.train()
    generate_image_codes(model, LAYOUT, [[1]], GREEDY)
    assert model.training


# ---------------------------------------------------------------------------------------------
# captioning


def test_captions_obey_the_constraint_even_against_the_model(model, boost_logits, random_codes):
    codes = random_codes(LAYOUT, 3)
    banned = ~text_token_mask(LAYOUT, N_COLS)  # boi, eoi, images, padding
    handle = boost_logits(model, banned, 1e4)
    try:
        sampled = SamplingConfig(seed=2, max_new_tokens=10)
        beams = SamplingConfig(num_beams=3, do_sample=False, max_new_tokens=10)
        for cfg in (GREEDY, sampled, beams):
            for caption in generate_captions(model, LAYOUT, codes, cfg):
                assert all(0 <= t < LAYOUT.eos_id for t in caption)  # text only, eos dropped
    finally:
        handle.remove()


def test_captions_stop_at_eos_or_max_new_tokens(model, boost_logits, random_codes):
    codes = random_codes(LAYOUT, 2)
    eos = torch.zeros(N_COLS, dtype=torch.bool)
    eos[LAYOUT.eos_id] = True
    handle = boost_logits(model, eos, -1e4)  # never stop
    try:
        out = generate_captions(model, LAYOUT, codes, SamplingConfig(max_new_tokens=5, seed=0))
        assert [len(c) for c in out] == [5, 5]
    finally:
        handle.remove()
    handle = boost_logits(model, eos, 1e4)  # stop at once
    try:
        assert generate_captions(model, LAYOUT, codes, GREEDY) == [[], []]
    finally:
        handle.remove()


def test_caption_cached_and_batched_equal_uncached_reference(
    model, image_prompt, random_codes, reference_greedy
):
    codes = random_codes(LAYOUT, 4)
    allowed = torch.zeros(N_COLS, dtype=torch.bool)
    allowed[: LAYOUT.text_vocab_size] = True
    cfg = SamplingConfig(do_sample=False, max_new_tokens=12, batch_size=3)
    captions = generate_captions(model, LAYOUT, codes, cfg)
    for image, got in zip(codes, captions, strict=True):
        ids = reference_greedy(model, image_prompt(LAYOUT, image), allowed, 12, stop=LAYOUT.eos_id)
        assert got == [t for t in ids if t != LAYOUT.eos_id]


def test_caption_edge_cases(model, boost_logits, random_codes):
    assert generate_captions(model, LAYOUT, random_codes(LAYOUT, 0), GREEDY) == []
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        generate_captions(model, LAYOUT, torch.zeros(2, 4, 4, dtype=torch.long), GREEDY)
    codes = random_codes(LAYOUT, 2)  # captions have no unconditional branch: cfg_scale is ignored
    guided = generate_captions(model, LAYOUT, codes, replace(GREEDY, cfg_scale=3.0))
    assert guided == generate_captions(model, LAYOUT, codes, GREEDY)
    room = N_POSITIONS - LAYOUT.tokens_per_image - 4  # eos boi codes eoi caption eos
    eos = torch.zeros(N_COLS, dtype=torch.bool)
    eos[LAYOUT.eos_id] = True
    handle = boost_logits(model, eos, -1e4)
    try:
        with pytest.warns(UserWarning, match=f"capped at {room}"):
            out = generate_captions(
                model, LAYOUT, random_codes(LAYOUT, 1), SamplingConfig(max_new_tokens=99)
            )
        assert len(out[0]) == room
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# the length rule: whatever decoding makes can be re-scored within n_positions (issue 18, fault 9)


def _no_eos(model, boost_logits):
    """A hook that makes `<|endoftext|>` impossible: every caption runs to its length limit."""
    eos = torch.zeros(N_COLS, dtype=torch.bool)
    eos[LAYOUT.eos_id] = True
    return boost_logits(model, eos, -1e4)


BUDGET = N_POSITIONS - LAYOUT.tokens_per_image - 4  # token_budget(...).caption: 27


def test_caption_rerank_at_the_maximum_length_rescoring_fits(model, boost_logits, random_codes):
    # the issue's `caption --rerank 2 --max-new-tokens 61` on a 128-position model: the longest
    # caption was re-scored one token past the position table (IndexError)
    codes = random_codes(LAYOUT, 2, seed=21)
    handle = _no_eos(model, boost_logits)
    try:
        for sampling in (
            SamplingConfig(do_sample=False, rerank=2, max_new_tokens=BUDGET + 1, seed=1),
            SamplingConfig(do_sample=True, rerank=3, max_new_tokens=99, seed=2),
        ):
            with pytest.warns(UserWarning, match=f"capped at {BUDGET}"):
                got = generate_captions(model, LAYOUT, codes, sampling)
            assert [len(c) for c in got] == [BUDGET, BUDGET]
            for target in ("caption", "image"):
                assert pair_logprobs(model, LAYOUT, codes, got, target).isfinite().all()
    finally:
        handle.remove()


def test_beam_search_at_the_maximum_length_can_be_rescored(model, boost_logits, random_codes):
    codes = random_codes(LAYOUT, 2, seed=22)
    handle = _no_eos(model, boost_logits)
    try:
        beams = SamplingConfig(do_sample=False, num_beams=3, max_new_tokens=BUDGET)
        got = generate_captions(model, LAYOUT, codes, beams)
        assert [len(c) for c in got] == [BUDGET, BUDGET]
        assert pair_logprobs(model, LAYOUT, codes, got, "caption").isfinite().all()
        reranked = generate_captions(model, LAYOUT, codes, replace(beams, rerank=2, seed=4))
        assert [len(c) for c in reranked] == [BUDGET, BUDGET]
    finally:
        handle.remove()


@pytest.mark.parametrize("prefix", [None, 12])
def test_best_of_n_images_with_a_prompt_that_fills_the_budget(tiny_gpt2, prefix):
    # best-of-N scores each drawn image in the captioning direction: the longest prompt must fit
    model = tiny_gpt2(LAYOUT, seed=5)
    model.config.t2i_prefix_length = prefix
    room = BUDGET if prefix is None else prefix - 1
    best_of = SamplingConfig(seed=3, rerank=2)
    codes = generate_image_codes(model, LAYOUT, [[7] * room, [3]], best_of)
    assert codes.shape == (2, *LAYOUT.grid)
    with pytest.raises(SequenceLengthError, match=f"at most {room} caption tokens"):
        generate_image_codes(model, LAYOUT, [[7] * (room + 1)], best_of)


def test_scoring_a_pair_too_long_is_a_clear_error(model, random_codes):
    codes = random_codes(LAYOUT, 1, seed=23)
    assert pair_logprobs(model, LAYOUT, codes, [[5] * BUDGET], "caption").isfinite().all()
    for target in ("caption", "image"):
        with pytest.raises(SequenceLengthError, match=f"n_positions={N_POSITIONS}"):
            pair_logprobs(model, LAYOUT, codes, [[5] * (BUDGET + 1)], target)


def test_a_model_too_short_for_an_image_and_a_caption(tiny_gpt2, random_codes):
    short = tiny_gpt2(LAYOUT, n_positions=LAYOUT.tokens_per_image + 4)  # room for no caption
    with pytest.raises(SequenceLengthError, match="no room for a caption"):
        generate_captions(short, LAYOUT, random_codes(LAYOUT, 1), GREEDY)
    assert generate_image_codes(short, LAYOUT, [[]], GREEDY).shape == (1, *LAYOUT.grid)
    shorter = tiny_gpt2(LAYOUT, n_positions=LAYOUT.tokens_per_image + 3)
    with pytest.raises(SequenceLengthError, match="cannot hold one image"):
        generate_image_codes(shorter, LAYOUT, [[]], GREEDY)
