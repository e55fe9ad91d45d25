"""Decoding: constraints, KV cache vs recomputation, padding, seeds, CFG, beam search."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import GPT2LMHeadModel

from vqgpt.config import ConfigError, from_dict
from vqgpt.lm.generate import (
    SamplingConfig,
    beam_search,
    caption_logprobs,
    decode_loop,
    generate_captions,
    generate_image_codes,
    guide,
    image_logprobs,
    image_token_mask,
    last_logits,
    narrow_head,
    rerank_captions,
    text_token_mask,
    warp,
)
from vqgpt.lm.sequences import SequenceConfig, build_t2i
from vqgpt.lm.vocab import VocabLayout

# a small text vocabulary keeps the model tiny: eos 99, boi 100, eoi 101, images 102..117
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
N_COLS = 128  # LAYOUT.vocab_size (118) padded to a multiple of 64 (the tiny_gpt2 fixture)
N_POSITIONS = 40  # the tiny_gpt2 fixture's default
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=10)
CAPTIONS = [[5, 17, 3], [], [42], [7, 7, 7, 7, 7, 1]]


@pytest.fixture(scope="module")
def model(tiny_gpt2) -> GPT2LMHeadModel:
    return tiny_gpt2(LAYOUT)


def boost_logits(model: GPT2LMHeadModel, columns: torch.Tensor, value: float):
    """Add `value` to the logits of `columns` (bool [V]); returns the hook handle."""

    def hook(_module, _inputs, output):
        return output + value * columns.to(output.dtype)

    return model.lm_head.register_forward_hook(hook)


def reference_greedy(model, prompt, allowed, steps, stop=None) -> list[int]:
    """Greedy decoding that reruns the whole sequence without a cache at every step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(token)
            if token == stop:
                break
            seq.append(token)
    return out


def constrained_score(model, prompt, continuation, allowed) -> float:
    """sum(log p) / length of `continuation` after `prompt`, p renormalised over `allowed`."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(continuation)])).logits[0]
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    start = len(prompt) - 1  # logits at position i predict token i + 1
    picked = logp[start : start + len(continuation)].gather(1, torch.tensor(continuation)[:, None])
    return float(picked.sum()) / len(continuation)


def image_prompt(codes: torch.Tensor) -> list[int]:
    return [LAYOUT.eos_id, LAYOUT.boi_id, *LAYOUT.codes_to_ids(codes).flatten().tolist()] + [
        LAYOUT.eoi_id
    ]


def random_codes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, LAYOUT.codebook_size, (n, *LAYOUT.grid), generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------------------------
# config and logits helpers


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
    assert kept(SamplingConfig(top_p=0.8)) == [True, True, False, False]  # 0.5 + 0.3 >= 0.8
    assert kept(SamplingConfig(top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingConfig(top_p=0.1)) == [True, False, False, False]  # the top one stays
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


# ---------------------------------------------------------------------------------------------
# text-to-image


def test_image_codes_obey_the_constraint_even_against_the_model(model):
    # make text, special and padded columns overwhelmingly likely: they must still never appear
    handle = boost_logits(model, ~image_token_mask(LAYOUT, N_COLS), 1e4)
    try:
        for cfg in (SamplingConfig(seed=3), GREEDY, SamplingConfig(cfg_scale=3.0, top_p=0.9)):
            codes = generate_image_codes(model, LAYOUT, CAPTIONS, cfg)
            assert codes.shape == (len(CAPTIONS), *LAYOUT.grid) and codes.dtype == torch.long
            assert int(codes.min()) >= 0 and int(codes.max()) < LAYOUT.codebook_size
    finally:
        handle.remove()


def test_image_cached_equals_uncached_reference(model):
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
    sampled = generate_image_codes(model, LAYOUT, CAPTIONS, SamplingConfig(top_k=1, seed=5))
    assert torch.equal(sampled, generate_image_codes(model, LAYOUT, CAPTIONS, GREEDY))


def test_cfg_scale_one_is_plain_sampling_and_other_scales_differ(model):
    allowed = image_token_mask(LAYOUT, N_COLS)
    prompts = [[LAYOUT.eos_id, *c, LAYOUT.boi_id] for c in CAPTIONS]
    uncond = [[LAYOUT.eos_id, LAYOUT.boi_id]] * len(prompts)
    steps = LAYOUT.tokens_per_image
    for cfg in (GREEDY, SamplingConfig(seed=4)):
        # the guided path with scale 1 (unconditional rows in the batch) == no guidance at all
        plain = generate_image_codes(model, LAYOUT, CAPTIONS, cfg)
        forced = decode_loop(
            model, prompts, allowed, cfg, steps, pad_id=LAYOUT.eos_id, uncond_prompts=uncond
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


def test_caption_logprobs_is_the_sum_of_constrained_caption_logprobs(model):
    codes = random_codes(3, seed=11)
    captions = [[5, 17, 3], [], [42, 42]]
    got = caption_logprobs(model, LAYOUT, codes, captions, batch_size=2)  # padded batches
    allowed = text_token_mask(LAYOUT, N_COLS)
    for i, (c, caption) in enumerate(zip(codes, captions, strict=True)):
        target = [*caption, LAYOUT.eos_id]
        want = constrained_score(model, image_prompt(c), target, allowed) * len(target)
        assert got[i].item() == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="B captions"):
        caption_logprobs(model, LAYOUT, codes, captions[:2])


def test_rerank_keeps_the_candidate_the_model_captions_best(model):
    prompts, n = [[5, 17, 3], [42]], 3
    sampling = SamplingConfig(seed=7, cfg_scale=2.0)
    best = generate_image_codes(model, LAYOUT, prompts, replace(sampling, rerank=n))
    rows = [p for p in prompts for _ in range(n)]
    candidates = generate_image_codes(model, LAYOUT, rows, sampling)  # the same seeded rows
    scores = caption_logprobs(model, LAYOUT, candidates, rows).view(len(prompts), n)
    assert scores.std(dim=1).min() > 0  # the candidates differ, so the choice means something
    for i in range(len(prompts)):
        assert torch.equal(best[i], candidates[i * n + int(scores[i].argmax())])
    assert best.shape == (len(prompts), *LAYOUT.grid)
    assert generate_image_codes(model, LAYOUT, [], replace(sampling, rerank=n)).shape[0] == 0
    with pytest.raises(ValueError, match="needs sampling"):
        generate_image_codes(model, LAYOUT, prompts, SamplingConfig(do_sample=False, rerank=2))


def test_image_logprobs_is_the_sum_of_constrained_code_logprobs(model):
    codes = random_codes(2, seed=12)
    captions = [[5, 17, 3], []]
    got = image_logprobs(model, LAYOUT, codes, captions)
    allowed = image_token_mask(LAYOUT, N_COLS)
    for i, (c, caption) in enumerate(zip(codes, captions, strict=True)):
        ids = LAYOUT.codes_to_ids(c).flatten().tolist()
        prompt = [LAYOUT.eos_id, *caption, LAYOUT.boi_id]  # no t2i_prefix_length: eos caption boi
        want = constrained_score(model, prompt, ids, allowed) * len(ids)
        assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_rerank_captions_keeps_the_best_noisy_channel_candidate(model):
    codes, n = random_codes(3, seed=13), 4
    sampling = SamplingConfig(do_sample=False, rerank=n, max_new_tokens=6, seed=2)
    got = generate_captions(model, LAYOUT, codes, sampling)
    greedy = generate_captions(model, LAYOUT, codes, replace(sampling, rerank=1))
    drawn = replace(sampling, rerank=1, do_sample=True)
    more = generate_captions(model, LAYOUT, codes.repeat_interleave(n - 1, dim=0), drawn)
    for i in range(len(codes)):
        cands = [greedy[i], *more[i * (n - 1) : (i + 1) * (n - 1)]]
        pairs = codes[[i] * len(cands)]
        score = caption_logprobs(model, LAYOUT, pairs, cands) + image_logprobs(
            model, LAYOUT, pairs, cands
        )
        assert got[i] == cands[int(score.argmax())]
    assert rerank_captions(model, LAYOUT, codes[:0], sampling) == []


def test_image_edge_cases(model):
    assert generate_image_codes(model, LAYOUT, [], GREEDY).shape == (0, *LAYOUT.grid)
    room = N_POSITIONS - LAYOUT.tokens_per_image - 2
    generate_image_codes(model, LAYOUT, [[1] * room], GREEDY)  # fits exactly
    with pytest.raises(ValueError, match=f"n_positions={N_POSITIONS}.*at most {room}"):
        generate_image_codes(model, LAYOUT, [[1] * (room + 1)], GREEDY)
    with pytest.raises(ValueError, match="text vocabulary"):
        generate_image_codes(model, LAYOUT, [[LAYOUT.boi_id]], GREEDY)


def test_t2i_prefix_length_prompts_match_training_format(tiny_gpt2):
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


def test_captions_obey_the_constraint_even_against_the_model(model):
    codes = random_codes(3)
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


def test_captions_stop_at_eos_or_max_new_tokens(model):
    codes = random_codes(2)
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


def test_caption_cached_and_batched_equal_uncached_reference(model):
    codes = random_codes(4)
    allowed = torch.zeros(N_COLS, dtype=torch.bool)
    allowed[: LAYOUT.text_vocab_size] = True
    cfg = SamplingConfig(do_sample=False, max_new_tokens=12, batch_size=3)
    captions = generate_captions(model, LAYOUT, codes, cfg)
    for image, got in zip(codes, captions, strict=True):
        ids = reference_greedy(model, image_prompt(image), allowed, 12, stop=LAYOUT.eos_id)
        assert got == [t for t in ids if t != LAYOUT.eos_id]


def test_beam_search(model):
    codes = random_codes(4, seed=7)
    prompts = [image_prompt(c) for c in codes]
    allowed = text_token_mask(LAYOUT, N_COLS)
    eos = LAYOUT.eos_id
    steps = 8
    # make eos a plausible choice so hypotheses of different lengths compete
    eos_mask = torch.zeros(N_COLS, dtype=torch.bool)
    eos_mask[eos] = True
    handle = boost_logits(model, eos_mask, 3.0)
    try:
        greedy = decode_loop(model, prompts, allowed, GREEDY, steps, pad_id=eos, stop_id=eos)
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


def test_caption_edge_cases(model):
    assert generate_captions(model, LAYOUT, random_codes(0), GREEDY) == []
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        generate_captions(model, LAYOUT, torch.zeros(2, 4, 4, dtype=torch.long), GREEDY)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_captions(model, LAYOUT, random_codes(1), SamplingConfig(cfg_scale=2.0))
    room = N_POSITIONS - LAYOUT.tokens_per_image - 3
    eos = torch.zeros(N_COLS, dtype=torch.bool)
    eos[LAYOUT.eos_id] = True
    handle = boost_logits(model, eos, -1e4)
    try:
        with pytest.warns(UserWarning, match=f"capped at {room}"):
            out = generate_captions(
                model, LAYOUT, random_codes(1), SamplingConfig(max_new_tokens=99)
            )
        assert len(out[0]) == room
    finally:
        handle.remove()
