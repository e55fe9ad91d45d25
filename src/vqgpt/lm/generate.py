"""Decoding tasks: text-to-image and captioning with constrained vocabularies, CFG, reranking.

Prompts follow the training formats of `vqgpt.lm.sequences` (`eos` = `<|endoftext|>`):

    text-to-image   eos caption boi  -> exactly h*w image tokens, then eoi (forced, not sampled)
    unconditional   eos boi          -> CFG's caption-dropped branch
    (a model trained with `sequences.t2i_prefix_length` P records it as
    `config.t2i_prefix_length`; its prompts are left-padded with eos to P tokens before boi,
    exactly as in training: see `sequences.t2i_prefix`)
    captioning      eos boi codes eoi -> text tokens until eos or max_new_tokens

Each token is chosen by the logits pipeline of `vqgpt.lm.sampling` inside the loops of
`vqgpt.lm.decoding`; this module builds the prompts, runs the loops in batches and scores
candidates (self-reranking in both directions).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from vqgpt.lm.decoding import (
    KVDecoder,
    beam_search,
    decode_loop,
    inference,
    max_positions,
    narrow_head,
    vocab_width,
)
from vqgpt.lm.positions import ImagePositions, forward_position_ids
from vqgpt.lm.sampling import (
    SamplingConfig,
    constrained_logprobs,
    image_token_mask,
    text_token_mask,
)
from vqgpt.lm.sequences import (
    IGNORE_INDEX,
    SequenceConfig,
    SequenceLengthError,
    TokenBudget,
    build_caption,
    build_t2i,
    check_length,
    collate,
    t2i_prefix,
    token_budget,
)
from vqgpt.lm.vocab import VocabLayout


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def t2i_prefix_length(model: nn.Module) -> int | None:
    """The t2i prefix length the model was trained with (`sequences.t2i_prefix_length`)."""
    return getattr(model.config, "t2i_prefix_length", None)


def model_budget(model: nn.Module, layout: VocabLayout) -> TokenBudget:
    """The length rule (`sequences.token_budget`) for this model's n_positions and prefix."""
    return token_budget(max_positions(model), layout, t2i_prefix_length(model))


class T2IPrompts(NamedTuple):
    """Text-to-image prompts as decoding feeds them."""

    prompts: list[list[int]]  # per caption: t2i_prefix(caption) + [boi]
    uncond_prompt: list[int] | None  # CFG's caption-dropped prompt; None when cfg_scale == 1


def t2i_prompts(
    model: nn.Module,
    layout: VocabLayout,
    captions: Sequence[Sequence[int]],
    sampling: SamplingConfig,
) -> T2IPrompts:
    """Checked prompts for caption ids, in the model's training format; clear errors otherwise."""
    if sampling.num_beams != 1:
        raise ValueError("num_beams > 1 is for captions; sample images or decode them greedily")
    prefix = t2i_prefix_length(model)
    room = model_budget(model, layout).t2i_caption
    out = []
    for i, caption in enumerate(captions):
        bad = [int(t) for t in caption if not 0 <= int(t) < layout.text_vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} holds ids outside the text vocabulary [0, {layout.text_vocab_size}): "
                f"{bad[:5]}; encode captions with JointTokenizer.encode_text"
            )
        if len(caption) > room:
            raise SequenceLengthError(
                f"prompt {i} has {len(caption)} tokens, but the model's n_positions="
                f"{max_positions(model)} ({layout.tokens_per_image} image tokens, eos, boi, eoi, "
                f"eos) and t2i_prefix_length={prefix} leave room for at most {room} caption "
                "tokens; shorten the caption"
            )
        out.append([*t2i_prefix(caption, layout, prefix), layout.boi_id])
    guided = sampling.cfg_scale != 1.0  # scale 1 is plain conditional sampling: no extra rows
    uncond = [*t2i_prefix([], layout, prefix), layout.boi_id] if guided else None
    return T2IPrompts(out, uncond)


class ImageSampler:
    """Text-to-image: codes [B, h, w] in [0, K) for caption ids, on a dynamic or static KV cache.

    Each row runs `eos caption boi` (in the model's training format, see `t2i_prompts`), then
    exactly h*w image-only steps; `eoi` follows by construction. cfg_scale != 1 adds the
    caption-dropped `eos boi` rows (see `decode_loop`). rerank > 1 draws that many candidates per
    prompt and keeps the best by `pair_logprobs(target="caption")`. Captions that do not fit the model
    (n_positions, t2i_prefix_length; `sequences.token_budget`) are a SequenceLengthError.

    `cache` / `compile`: see `KVDecoder`; "static" (compiled on CUDA) is the fast path on GPUs,
    and gives the same codes as "dynamic". The sampler holds a copy of the output layer's image
    rows (the narrow head): make a new one after the model's weights change.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: VocabLayout,
        cache: str = "dynamic",
        compile: bool | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        device = next(model.parameters()).device
        self.allowed = image_token_mask(layout, vocab_width(model), device)
        self.decoder = KVDecoder(model, cache, narrow_head(model, self.allowed), compile)

    def __call__(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None
    ) -> Tensor:
        """Codes [B, h, w] for caption ids (GPT-2 ids without specials; [] = none)."""
        sampling = sampling or SamplingConfig()
        layout, model = self.layout, self.model
        h, w = layout.grid
        if sampling.rerank > 1:
            return rerank_by_caption(model, layout, prompts, sampling, self)
        t2i = t2i_prompts(model, layout, prompts, sampling)
        if not prompts:
            return torch.empty(0, h, w, dtype=torch.long, device=self.decoder.device)
        full, uncond = t2i.prompts, t2i.uncond_prompt
        codes = []
        with inference(model):
            for part in _chunks(len(full), sampling.batch_size):
                batch = full[part]
                out = decode_loop(
                    self.decoder,
                    batch,
                    self.allowed,
                    sampling,
                    layout.tokens_per_image,
                    pad_id=layout.eos_id,
                    uncond_prompts=[uncond] * len(batch) if uncond else None,
                    row_ids=range(part.start, part.stop),
                )
                codes.append(layout.ids_to_codes(out.tokens))
        return rearrange(torch.cat(codes), "b (h w) -> b h w", h=h, w=w)


def generate_image_codes(
    model: nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    cache: str = "dynamic",
) -> Tensor:
    """Codes [B, h, w] in [0, K) for caption ids: one call of an `ImageSampler` (see there)."""
    return ImageSampler(model, layout, cache)(prompts, sampling)


def _target_logprobs(
    model: nn.Module, examples: Sequence, allowed: Tensor, keep, pad_id: int, batch_size: int
) -> Tensor:
    """Summed log-probs [B] of each example's targets where `keep(targets)` holds, every token's
    log-prob renormalised over the `allowed` ids (teacher forcing, one forward per batch)."""
    device = next(model.parameters()).device
    allowed = allowed.to(device)
    out = []
    with inference(model):
        for part in _chunks(len(examples), batch_size):
            batch = collate(examples[part], pad_id=pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            positions = forward_position_ids(ids, mask, ImagePositions.of(model.config))
            hidden = model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions
            ).last_hidden_state[:, :-1]  # position t predicts token t + 1
            targets = batch["labels"][:, 1:].to(device)
            scored = (targets != IGNORE_INDEX) & keep(targets)  # the head runs there only
            logits = model.get_output_embeddings()(hidden[scored])  # (targets, V)
            logp = constrained_logprobs(logits, allowed)
            picked = logp.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
            row = torch.arange(len(targets), device=device).unsqueeze(1).expand_as(targets)
            out.append(torch.zeros(len(targets), device=device).index_add(0, row[scored], picked))
    return torch.cat(out) if out else torch.empty(0, device=device)


def _check_pairs(layout: VocabLayout, codes: Tensor, captions: Sequence) -> Tensor:
    codes = torch.as_tensor(codes)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != layout.grid or len(captions) != len(codes):
        raise ValueError(
            f"need codes [B, {layout.grid[0]}, {layout.grid[1]}] and B captions, got codes "
            f"{tuple(codes.shape)} and {len(captions)} captions"
        )
    return codes.cpu()


def pair_logprobs(
    model: nn.Module,
    layout: VocabLayout,
    codes: Tensor,
    captions: Sequence[Sequence[int]],
    target: str,
    batch_size: int = 64,
) -> Tensor:
    """Summed log-probs [B] of one side of each (image codes [B, h, w], caption ids) pair, given
    the other, each token renormalised over the ids decoding would allow there (teacher forcing):

    target "caption"  log p(caption eos | image) in the captioning format `eos boi codes eoi`,
                      over the text ids, as caption decoding does;
    target "image"    log p(codes | caption) in the model's text-to-image format (`t2i_prompts`),
                      the sum over the h*w codes, over the image ids, as image decoding does.
    Captions are GPT-2 ids without specials; a pair longer than the model's n_positions is a
    SequenceLengthError (decoding never makes one: `sequences.token_budget`).
    """
    codes = _check_pairs(layout, codes, captions)
    pairs = zip(codes, captions, strict=True)
    if target == "caption":
        seq = SequenceConfig()
        examples = [build_caption(c, ids, layout, seq) for c, ids in pairs]
        allowed = text_token_mask(layout, vocab_width(model))

        def keep(targets: Tensor) -> Tensor:  # every target: the caption and its eos
            return torch.ones_like(targets, dtype=torch.bool)

    elif target == "image":
        prefix = t2i_prefix_length(model)
        seq = SequenceConfig(max_length=max_positions(model), t2i_prefix_length=prefix)
        examples = [build_t2i(c, ids, layout, seq) for c, ids in pairs]
        allowed = image_token_mask(layout, vocab_width(model))
        keep = layout.is_image  # the codes, not boi / eoi / eos
    else:
        raise ValueError(f"target must be 'caption' or 'image', got {target!r}")
    for i, example in enumerate(examples):
        check_length(len(example), max_positions(model), f"pair {i} in the {target} direction")
    return _target_logprobs(model, examples, allowed, keep, layout.eos_id, batch_size)


def rerank_by_caption(
    model: nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    draw: Callable[[Sequence[Sequence[int]], SamplingConfig], Tensor],
) -> Tensor:
    """Best of `sampling.rerank` candidates per prompt by `pair_logprobs(target="caption")`: codes [B, h, w].

    `draw(rows, sampling)` samples the candidates (an `ImageSampler`);
    candidate j of prompt i is row i*n + j, so it has its own seeded generator.
    """
    if not sampling.do_sample:
        raise ValueError("rerank > 1 needs sampling (greedy decoding draws one candidate)")
    n = sampling.rerank
    rows = [p for p in prompts for _ in range(n)]
    candidates = draw(rows, replace(sampling, rerank=1))
    if not prompts:
        return candidates
    scores = pair_logprobs(model, layout, candidates, rows, "caption", sampling.batch_size)
    best = rearrange(scores, "(b n) -> b n", n=n).argmax(1)
    grouped = rearrange(candidates, "(b n) h w -> b n h w", n=n)
    return grouped[torch.arange(len(prompts), device=grouped.device), best.to(grouped.device)]


def _capped(model: nn.Module, layout: VocabLayout, sampling: SamplingConfig) -> SamplingConfig:
    """`sampling` with max_new_tokens capped at the caption budget, with one warning (the
    candidates of a reranked or beam search then decode under the cap without another)."""
    room = model_budget(model, layout).caption
    if room < 1:
        raise SequenceLengthError(
            f"the model's n_positions={max_positions(model)} leaves no room for a caption after "
            f"an image ({layout.tokens_per_image} codes + 4 framing tokens)"
        )
    max_new = sampling.max_new_tokens
    if max_new <= room:
        return sampling
    warnings.warn(
        f"max_new_tokens={max_new} capped at {room}: n_positions={max_positions(model)} minus "
        f"the {layout.tokens_per_image} image tokens and 4 framing tokens (eos boi eoi eos)",
        stacklevel=3,
    )
    return replace(sampling, max_new_tokens=room)


def rerank_captions(
    model: nn.Module, layout: VocabLayout, codes: Tensor, sampling: SamplingConfig
) -> list[list[int]]:
    """Noisy-channel self-reranking of captions for image codes [B, h, w].

    Candidates per image: the caption `sampling` decodes (greedy, beam or sampled) plus
    `rerank - 1` sampled ones (at `sampling.temperature` / top-k / top-p); the kept one has the
    highest log p(caption | image) + log p(image | caption), the second term from the same model
    read in the text-to-image direction (`pair_logprobs(target="image")`).
    """
    n, codes = sampling.rerank, torch.as_tensor(codes)
    sampling = _capped(model, layout, sampling)
    first = generate_captions(model, layout, codes, replace(sampling, rerank=1))
    drawn = replace(sampling, rerank=1, do_sample=True, num_beams=1)
    more = generate_captions(model, layout, codes.repeat_interleave(n - 1, dim=0), drawn)
    candidates = [
        list(dict.fromkeys(map(tuple, [first[i], *more[i * (n - 1) : (i + 1) * (n - 1)]])))
        for i in range(len(first))
    ]  # distinct candidates, the decoded one first (it wins ties)
    owner = torch.tensor([i for i, cands in enumerate(candidates) for _ in cands], dtype=torch.long)
    flat = [list(c) for cands in candidates for c in cands]
    if not flat:
        return []
    pairs = codes.cpu()[owner]
    caption = pair_logprobs(model, layout, pairs, flat, "caption", sampling.batch_size)
    score = caption + pair_logprobs(model, layout, pairs, flat, "image", sampling.batch_size)
    out, start = [], 0
    for cands in candidates:
        best = int(score[start : start + len(cands)].argmax())
        out.append(flat[start + best])
        start += len(cands)
    return out


def generate_captions(
    model: nn.Module,
    layout: VocabLayout,
    codes: Tensor,
    sampling: SamplingConfig | None = None,
) -> list[list[int]]:
    """Caption ids (text only, final eos dropped) for image codes [B, h, w].

    Greedy when do_sample is false and num_beams is 1, beam search when num_beams > 1, else
    sampling. A row stops at `<|endoftext|>` or after max_new_tokens, which is capped (with a
    warning) at the length rule's caption budget (`sequences.token_budget`: the caption plus its
    closing eos fit the model's n_positions, so it can be re-scored). `sampling.cfg_scale` is
    ignored: no unconditional branch is trained for captions.
    """
    sampling = sampling or SamplingConfig()
    codes = torch.as_tensor(codes)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != layout.grid:
        raise ValueError(
            f"codes must be [B, h, w] with (h, w) = {layout.grid}, got {tuple(codes.shape)}"
        )
    sampling = _capped(model, layout, sampling)  # warns once, whatever the candidates
    if sampling.rerank > 1:
        return rerank_captions(model, layout, codes, sampling)
    max_new = sampling.max_new_tokens
    if codes.shape[0] == 0:
        return []
    device = next(model.parameters()).device
    allowed = text_token_mask(layout, vocab_width(model), device)
    image_ids = rearrange(layout.codes_to_ids(codes), "b h w -> b (h w)").tolist()
    full = [[layout.eos_id, layout.boi_id, *ids, layout.eoi_id] for ids in image_ids]
    decoder = KVDecoder(model, "dynamic", narrow_head(model, allowed))  # text: no narrow head
    captions: list[list[int]] = []
    with inference(model):
        for part in _chunks(len(full), sampling.batch_size):
            batch = full[part]
            if sampling.num_beams > 1:
                out = beam_search(
                    model,
                    batch,
                    allowed,
                    sampling.num_beams,
                    max_new,
                    stop_id=layout.eos_id,
                    pad_id=layout.eos_id,
                )
                captions += out.sequences
                continue
            out = decode_loop(
                decoder,
                batch,
                allowed,
                sampling,
                max_new,
                pad_id=layout.eos_id,
                stop_id=layout.eos_id,
                row_ids=range(part.start, part.stop),
            )
            for row, length in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
                captions.append([t for t in row[:length] if t != layout.eos_id])
    return captions


__all__ = [
    "ImageSampler",
    "T2IPrompts",
    "generate_captions",
    "generate_image_codes",
    "model_budget",
    "pair_logprobs",
    "rerank_by_caption",
    "rerank_captions",
    "t2i_prefix_length",
    "t2i_prompts",
]
