"""Decoding: text-to-image and captioning with constrained vocabularies, CFG and the KV cache.

Prompts follow the training formats of `vqgpt.lm.sequences` (`eos` = `<|endoftext|>`):

    text-to-image   eos caption boi  -> exactly h*w image tokens, then eoi (forced, not sampled)
    unconditional   eos boi          -> CFG's caption-dropped branch
    (a model trained with `sequences.t2i_prefix_length` P records it as
    `config.t2i_prefix_length`; its prompts are left-padded with eos to P tokens before boi,
    exactly as in training: see `sequences.t2i_prefix`)
    captioning      eos boi codes eoi -> text tokens until eos or max_new_tokens

Every step masks the disallowed ids (other modality, special tokens, the model's padded embedding
rows) to -inf, renormalises over the allowed ones, then applies CFG, temperature, top-k and top-p
in that order (`next_token_scores`, the one place for it).

Batches: prompts are left-padded to one length; the attention mask hides the padding and position
ids count real tokens only, so a padded row sees what its unpadded run would. The prompt is run
once, then one token per step through the KV cache.

Randomness: row i of a call (its index in the prompt list) samples with its own generator seeded
from (seed, i), by the Gumbel-max trick. A row's tokens therefore depend on the seed and its
index, not on `batch_size` or the other prompts, except where a different batch shape changes
floating-point rounding enough to flip a near-tie. Greedy and beam search use no randomness.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import DynamicCache

from vqgpt.config import ConfigError
from vqgpt.lm.sequences import IGNORE, SequenceConfig, build_caption, build_t2i, collate, t2i_prefix
from vqgpt.lm.vocab import VocabLayout

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingConfig:
    """How tokens are chosen: sampling filters, guidance, seed, beams, batching."""

    temperature: float = 1.0  # divides the log-probs; sampling only
    top_k: int = 0  # keep the k most likely tokens (0 = off); sampling only
    top_p: float = 1.0  # keep the smallest set with this much mass (1 = off); sampling only
    cfg_scale: float = 1.0  # text-to-image guidance: u + s * (c - u); 1 = off, 0 = unconditional
    seed: int | None = 0  # None: drawn from torch's global RNG (so torch.manual_seed governs it)
    max_new_tokens: int = 48  # caption length limit (images always take h*w tokens)
    num_beams: int = 1  # > 1: beam search for captions (needs do_sample false)
    do_sample: bool = True  # false: greedy (or beam search); temperature/top-k/top-p unused
    batch_size: int = 64  # prompts per forward pass (CFG doubles the rows, beams multiply them)
    # > 1: self-reranking, 1 = off. Text-to-image: draw this many images per prompt, keep the one
    # whose caption the LM itself finds most likely (CogView's, `rerank_by_caption`). Captions:
    # the decoded caption plus rerank - 1 sampled ones, kept by log p(caption | image) +
    # log p(image | caption) (noisy channel, `rerank_captions`)
    rerank: int = 1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ConfigError(f"sampling.cfg_scale must be >= 0 (1 = off), got {self.cfg_scale}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"sampling.seed must be null or in [0, 2**63), got {self.seed}")
        for name in ("max_new_tokens", "num_beams", "batch_size", "rerank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError(
                f"sampling.num_beams={self.num_beams} needs sampling.do_sample: false "
                "(beam search is deterministic; beam sampling is not supported)"
            )


class DecodeOutput(NamedTuple):
    """Tokens chosen by `decode_loop`."""

    tokens: Tensor  # [B, n] long; after a row's stop token, the rest is the stop id
    lengths: Tensor  # [B] long: tokens generated per row, its stop token included


class BeamOutput(NamedTuple):
    """Best hypothesis per prompt from `beam_search`."""

    sequences: list[list[int]]  # generated ids, without the stop token
    scores: Tensor  # [B] float: sum of constrained log-probs / length (stop token counted)


# ---------------------------------------------------------------------------------------------
# allowed ids and the per-step logits pipeline


def _allowed(lo: int, hi: int, n_cols: int, device: torch.device) -> Tensor:
    """Bool [n_cols]: True on ids [lo, hi)."""
    ids = torch.arange(n_cols, device=device)
    return (ids >= lo) & (ids < hi)


def image_token_mask(
    layout: VocabLayout, n_cols: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Bool [n_cols]: the image-code ids (never text, special or padded rows)."""
    _check_columns(layout, n_cols)
    return _allowed(layout.image_offset, layout.vocab_size, n_cols, torch.device(device))


def text_token_mask(layout: VocabLayout, n_cols: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool [n_cols]: the base-vocabulary ids, `<|endoftext|>` included (no boi/eoi/images)."""
    _check_columns(layout, n_cols)
    return _allowed(0, layout.text_vocab_size, n_cols, torch.device(device))


def _check_columns(layout: VocabLayout, n_cols: int) -> None:
    if n_cols < layout.vocab_size:
        raise ValueError(
            f"the model has {n_cols} logit columns but the joint vocabulary needs "
            f"{layout.vocab_size}: resize it with vqgpt.lm.model.resize_for_vocab or load the model "
            f"trained with this vocabulary"
        )


def constrained_logprobs(logits: Tensor, allowed: Tensor) -> Tensor:
    """Float32 log-softmax over the `allowed` ids of logits [N, V]; -inf elsewhere."""
    return logits.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)


def guide(cond: Tensor, uncond: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """Classifier-free guidance on constrained log-probs: `u + scale * (c - u)` on allowed ids.

    On log-probs rather than logits: each branch's log-normaliser is a per-row constant, so the
    two choices give the same distribution after the softmax; log-probs keep both branches on one
    scale and finite on every allowed id (logits masked with -inf would give inf - inf = nan).
    """
    mixed = uncond + scale * (cond - uncond)
    return mixed.masked_fill(~allowed, float("-inf"))


def warp(scores: Tensor, sampling: SamplingConfig) -> Tensor:
    """Temperature, then top-k, then top-p on scores [N, V] (-inf = excluded)."""
    scores = scores / sampling.temperature
    if sampling.top_k > 0:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the ones ranked above it already hold top_p (the top one stays)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scores


def pick(
    scores: Tensor, sampling: SamplingConfig, generators: Sequence[torch.Generator] | None
) -> Tensor:
    """Next token per row of scores [N, V]: argmax, or a sample with row i's own generator."""
    if not sampling.do_sample:
        return scores.argmax(dim=-1)
    if generators is None or len(generators) != scores.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    # Gumbel-max: argmax(log p + G) is a sample from p; per-row noise keeps rows independent
    uniform = torch.stack(
        [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in generators]
    )  # (N, V)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    return (scores + gumbel).argmax(dim=-1)  # scores need no normalising: argmax ignores shifts


def next_token_scores(
    logits: Tensor, allowed: Tensor, sampling: SamplingConfig, guided: bool = False
) -> Tensor:
    """Logits [N, V] -> the scores `pick` chooses from; with `guided`, rows are [cond; uncond].

    Pipeline: mask + renormalise over `allowed` -> CFG (guided: [2B, V] -> [B, V]) ->
    temperature / top-k / top-p (sampling only; they never change an argmax).
    """
    scores = constrained_logprobs(logits, allowed)
    if guided:
        cond, uncond = scores.chunk(2, dim=0)
        scores = guide(cond, uncond, sampling.cfg_scale, allowed)
    return warp(scores, sampling) if sampling.do_sample else scores


# ---------------------------------------------------------------------------------------------
# seeds


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def row_generators(
    seed: int, row_ids: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per row, seeded from (seed, row id): independent of batch composition."""
    gens = []
    for row in row_ids:
        g = torch.Generator(device=device)
        g.manual_seed(_mix64((seed * 0x9E3779B97F4A7C15 + row + 1) & _MASK64) >> 1)
        gens.append(g)
    return gens


def _base_seed(sampling: SamplingConfig) -> int:
    """The configured seed, or one drawn from torch's global RNG."""
    if sampling.seed is not None:
        return sampling.seed
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# the model with its KV cache


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name warns)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def max_positions(model: nn.Module) -> int:
    """Longest sequence the model's position table covers."""
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


class NarrowHead(NamedTuple):
    """The output layer cut to the ids a decoding step may choose (`narrow_head`)."""

    columns: Tensor  # [C] long: the token id of each logit column
    weight: Tensor  # [C, d]
    bias: Tensor | None  # [C]


def narrow_head(model: nn.Module, allowed: Tensor) -> NarrowHead | None:
    """The output layer's rows of the `allowed` ids when they are at most half of them.

    Image decoding allows ~1k of GPT-2's ~51k ids: the full head is ~80% of a decoding step's
    FLOPs on the `mini` LM, and the masked columns never matter. None when the model has no
    separate base model and linear head, or when too many ids are allowed to gain.
    """
    head, base = model.get_output_embeddings(), getattr(model, "base_model", model)
    if base is model or not isinstance(head, nn.Linear) or int(allowed.sum()) * 2 > len(allowed):
        return None
    columns = allowed.nonzero().squeeze(1).to(head.weight.device)
    bias = None if head.bias is None else head.bias[columns]
    return NarrowHead(columns, head.weight[columns], bias)


def last_logits(model: nn.Module, head: NarrowHead | None = None, **inputs) -> Tensor:
    """Next-token logits at each row's last position: [N, V], or [N, C] over `head.columns`."""
    if head is None:
        return model(**inputs, logits_to_keep=1).logits[:, -1]
    hidden = model.base_model(**inputs).last_hidden_state[:, -1]
    return F.linear(hidden, head.weight, head.bias)


class _Session:
    """A batch of prompts in the KV cache: one left-padded prefill, then one token per step.

    With a `NarrowHead` the logits cover its columns only ([N, C] instead of [N, V]).
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        pad_id: int,
        head: NarrowHead | None = None,
    ) -> None:
        device = next(model.parameters()).device
        length = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: the last token is the newest
            ids[row, length - len(prompt) :] = torch.as_tensor(list(prompt), device=device)
            mask[row, length - len(prompt) :] = 1
        self.model = model
        self.head = head
        self.cache = DynamicCache(config=model.config)
        self.cache_kwarg = _cache_kwarg(model)
        self.mask = mask  # (N, T): grows by one column per step
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # real tokens count from 0
        self.next_position = mask.sum(dim=-1)  # (N,)
        self.logits = self._forward(ids, positions)  # (N, V) at each prompt's last token

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        return last_logits(
            self.model,
            self.head,
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},  # a DynamicCache is updated in place
        )

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token [N] per row; returns next-token logits [N, V]."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = rearrange(self.next_position, "n -> n 1")
        self.next_position = self.next_position + 1
        self.logits = self._forward(rearrange(tokens, "n -> n 1"), positions)
        return self.logits

    def select(self, index: Tensor) -> None:
        """Keep / reorder / repeat rows: row i becomes old row index[i] (cache included)."""
        self.cache.reorder_cache(index)  # index_select on every layer's keys and values
        self.mask = self.mask[index]
        self.next_position = self.next_position[index]
        self.logits = self.logits[index]


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# loops


def decode_loop(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    allowed: Tensor,
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    pad_id: int,
    stop_id: int | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    row_ids: Sequence[int] | None = None,
) -> DecodeOutput:
    """Greedy or sampled decoding of up to `max_new_tokens` tokens from `allowed` ids.

    Rows stop at `stop_id` (None: run all `max_new_tokens` steps). With `uncond_prompts` (one per
    prompt) the unconditional rows run in the same batch and every step samples from
    `u + cfg_scale * (c - u)`, appending the token to both rows. `row_ids` seed the per-row
    generators (default 0..B-1). The last token is never fed back: nothing reads its logits.
    """
    n = len(prompts)
    guided = uncond_prompts is not None
    if guided and len(uncond_prompts) != n:
        raise ValueError(f"{len(uncond_prompts)} unconditional prompts for {n} prompts")
    row_ids = list(range(n)) if row_ids is None else list(row_ids)
    if len(row_ids) != n:
        raise ValueError(f"{len(row_ids)} row ids for {n} prompts")
    head = narrow_head(model, allowed.to(next(model.parameters()).device))
    session = _Session(model, [*prompts, *(uncond_prompts or [])], pad_id, head)
    if head is not None:  # logits cover the allowed ids only: column j is id head.columns[j]
        allowed = torch.ones(len(head.columns), dtype=torch.bool)
    allowed = allowed.to(session.logits.device)
    generators = None
    if sampling.do_sample:
        generators = row_generators(_base_seed(sampling), row_ids, session.logits.device)
    device = session.logits.device
    fill = pad_id if stop_id is None else stop_id
    tokens = torch.full((n, max_new_tokens), fill, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    running = torch.ones(n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scores = next_token_scores(session.logits, allowed, sampling, guided)  # (n, V or C)
        picked = pick(scores, sampling, generators)
        if head is not None:
            picked = head.columns[picked]
        chosen = torch.where(running, picked, fill)
        tokens[:, t] = chosen
        lengths += running.long()
        if stop_id is not None:
            running &= chosen != stop_id
        if t == max_new_tokens - 1 or not running.any():
            break
        session.step(torch.cat([chosen, chosen]) if guided else chosen)
    return DecodeOutput(tokens, lengths)


def beam_search(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    allowed: Tensor,
    num_beams: int,
    max_new_tokens: int,
    *,
    stop_id: int,
    pad_id: int,
) -> BeamOutput:
    """Length-normalised beam search over the constrained distribution, with the KV cache.

    A hypothesis scores sum(log p) / length, log p renormalised over `allowed`, the stop token
    counted in the length; one that hits `max_new_tokens` ends there. The cache follows the beams
    by `index_select` on its tensors. A prompt is done once it has `num_beams` finished
    hypotheses and no running beam, ended now, would beat the worst of them (Hugging Face's
    default stopping rule; with num_beams=1 this is exactly greedy decoding).
    """
    n, k = len(prompts), num_beams
    session = _Session(model, prompts, pad_id)
    device = session.logits.device
    allowed = allowed.to(device)
    session.select(torch.arange(n, device=device).repeat_interleave(k))  # (n * k) rows
    beam_scores = torch.full((n, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # identical beams at first: expand only one of them
    seqs = torch.empty(n * k, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    done = [False] * n
    for t in range(max_new_tokens):
        logprobs = constrained_logprobs(session.logits, allowed)  # (n * k, V)
        vocab = logprobs.shape[-1]
        totals = rearrange(beam_scores, "n k -> (n k) 1") + logprobs
        totals = rearrange(totals, "(n k) v -> n (k v)", k=k)
        # 2k candidates: at most k of them stop, so k can always run on
        top, top_idx = totals.topk(min(2 * k, totals.shape[-1]), dim=-1)  # (n, 2k)
        top, top_idx = top.tolist(), top_idx.tolist()
        src = torch.zeros(n, k, dtype=torch.long)
        tok = torch.full((n, k), pad_id, dtype=torch.long)
        new_scores = torch.full((n, k), float("-inf"))
        for b in range(n):
            kept = 0
            for rank, (score, idx) in enumerate(zip(top[b], top_idx[b], strict=True)):
                if done[b] or kept == k or score == float("-inf"):
                    break
                beam, token = divmod(idx, vocab)
                if token == stop_id:
                    if rank < k:  # a stop ranked below k would not have been a beam
                        finished[b].append((score / (t + 1), seqs[b * k + beam].tolist()))
                    continue
                src[b, kept], tok[b, kept], new_scores[b, kept] = beam, token, score
                kept += 1
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
            best_running = float(new_scores[b].max())
            if best_running == float("-inf") or (
                len(finished[b]) == k and finished[b][-1][0] >= best_running / (t + 1)
            ):
                done[b] = True
        rows = (torch.arange(n).unsqueeze(1) * k + src).flatten().to(device)  # (n * k)
        seqs = torch.cat([seqs[rows], tok.flatten().to(device).unsqueeze(1)], dim=1)
        beam_scores = new_scores.to(device)
        if all(done):
            break
        if t == max_new_tokens - 1:  # out of room: the running beams end here
            for b in range(n):
                if not done[b]:
                    finished[b] += [
                        (float(new_scores[b, j]) / (t + 1), seqs[b * k + j].tolist())
                        for j in range(k)
                        if new_scores[b, j] > float("-inf")
                    ]
            break
        session.select(rows)
        session.step(seqs[:, -1])
    best = [max(hyps, key=lambda h: h[0], default=(float("-inf"), [])) for hyps in finished]
    return BeamOutput([seq for _, seq in best], torch.tensor([s for s, _ in best]))


# ---------------------------------------------------------------------------------------------
# tasks


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _vocab_width(model: nn.Module) -> int:
    """Logit columns (the padded vocabulary)."""
    return model.get_output_embeddings().weight.shape[0]


def t2i_prefix_length(model: nn.Module) -> int | None:
    """The t2i prefix length the model was trained with (`sequences.t2i_prefix_length`)."""
    return getattr(model.config, "t2i_prefix_length", None)


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
    room = max_positions(model) - layout.tokens_per_image - 2
    if prefix is not None:
        room = min(room, prefix - 1)
    out = []
    for i, caption in enumerate(captions):
        bad = [int(t) for t in caption if not 0 <= int(t) < layout.text_vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} holds ids outside the text vocabulary [0, {layout.text_vocab_size}): "
                f"{bad[:5]}; encode captions with JointTokenizer.encode_text"
            )
        if len(caption) > room:
            raise ValueError(
                f"prompt {i} has {len(caption)} tokens, but the model's n_positions="
                f"{max_positions(model)} ({layout.tokens_per_image} image tokens, eos, boi) and "
                f"t2i_prefix_length={prefix} leave room for at most {room} caption tokens; "
                "shorten the caption"
            )
        out.append([*t2i_prefix(caption, layout, prefix), layout.boi_id])
    guided = sampling.cfg_scale != 1.0  # scale 1 is plain conditional sampling: no extra rows
    uncond = [*t2i_prefix([], layout, prefix), layout.boi_id] if guided else None
    return T2IPrompts(out, uncond)


def generate_image_codes(
    model: nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
) -> Tensor:
    """Codes [B, h, w] in [0, K) for caption ids (GPT-2 ids without specials; [] = none).

    Each row runs `eos caption boi` (in the model's training format, see `t2i_prompts`), then
    exactly h*w image-only steps; `eoi` follows by construction. cfg_scale != 1 adds the
    caption-dropped `eos boi` rows (see `decode_loop`). rerank > 1 draws that many candidates per
    prompt and keeps the best by `caption_logprobs`. Captions that do not fit the model
    (n_positions, t2i_prefix_length) are a ValueError.
    """
    sampling = sampling or SamplingConfig()
    h, w = layout.grid
    if sampling.rerank > 1:
        draw = partial(generate_image_codes, model, layout)
        return rerank_by_caption(model, layout, prompts, sampling, draw)
    t2i = t2i_prompts(model, layout, prompts, sampling)
    device = next(model.parameters()).device
    if not prompts:
        return torch.empty(0, h, w, dtype=torch.long, device=device)
    allowed = image_token_mask(layout, _vocab_width(model), device)
    full, uncond = t2i.prompts, t2i.uncond_prompt
    codes = []
    with _inference(model):
        for part in _chunks(len(full), sampling.batch_size):
            batch = full[part]
            out = decode_loop(
                model,
                batch,
                allowed,
                sampling,
                layout.tokens_per_image,
                pad_id=layout.eos_id,
                uncond_prompts=[uncond] * len(batch) if uncond else None,
                row_ids=range(part.start, part.stop),
            )
            codes.append(layout.ids_to_codes(out.tokens))
    return rearrange(torch.cat(codes), "b (h w) -> b h w", h=h, w=w)


def _target_logprobs(
    model: nn.Module, examples: Sequence, allowed: Tensor, keep, pad_id: int, batch_size: int
) -> Tensor:
    """Summed log-probs [B] of each example's targets where `keep(targets)` holds, every token's
    log-prob renormalised over the `allowed` ids (teacher forcing, one forward per batch)."""
    device = next(model.parameters()).device
    allowed = allowed.to(device)
    out = []
    with _inference(model):
        for part in _chunks(len(examples), batch_size):
            batch = collate(examples[part], pad_id=pad_id)
            hidden = model.base_model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).last_hidden_state[:, :-1]  # position t predicts token t + 1
            targets = batch["labels"][:, 1:].to(device)
            scored = (targets != IGNORE) & keep(targets)  # the head runs there only
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


def caption_logprobs(
    model: nn.Module,
    layout: VocabLayout,
    codes: Tensor,
    captions: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> Tensor:
    """log p(caption eos | image) [B] under the model's captioning format `eos boi codes eoi`.

    Each token's log-prob is renormalised over the text ids, as caption decoding does, and the
    row's are summed. Codes [B, h, w]; captions are GPT-2 ids without specials.
    """
    codes = _check_pairs(layout, codes, captions)
    seq = SequenceConfig()
    examples = [build_caption(c, ids, layout, seq) for c, ids in zip(codes, captions, strict=True)]
    allowed = text_token_mask(layout, _vocab_width(model))

    def every(targets: Tensor) -> Tensor:
        return torch.ones_like(targets, dtype=torch.bool)

    return _target_logprobs(model, examples, allowed, every, layout.eos_id, batch_size)


def image_logprobs(
    model: nn.Module,
    layout: VocabLayout,
    codes: Tensor,
    captions: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> Tensor:
    """log p(codes | caption) [B] in the model's text-to-image format (`t2i_prompts`): the sum
    over the h*w codes, each renormalised over the image ids, as image decoding does."""
    codes = _check_pairs(layout, codes, captions)
    prefix = t2i_prefix_length(model)
    seq = SequenceConfig(max_length=max_positions(model), t2i_prefix_length=prefix)
    examples = [build_t2i(c, ids, layout, seq) for c, ids in zip(codes, captions, strict=True)]
    allowed = image_token_mask(layout, _vocab_width(model))
    return _target_logprobs(model, examples, allowed, layout.is_image, layout.eos_id, batch_size)


def rerank_by_caption(
    model: nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    draw: Callable[[Sequence[Sequence[int]], SamplingConfig], Tensor],
) -> Tensor:
    """Best of `sampling.rerank` candidates per prompt by `caption_logprobs`: codes [B, h, w].

    `draw(rows, sampling)` samples the candidates (`generate_image_codes` or a fast sampler);
    candidate j of prompt i is row i*n + j, so it has its own seeded generator.
    """
    if not sampling.do_sample:
        raise ValueError("rerank > 1 needs sampling (greedy decoding draws one candidate)")
    n = sampling.rerank
    rows = [p for p in prompts for _ in range(n)]
    candidates = draw(rows, replace(sampling, rerank=1))
    if not prompts:
        return candidates
    scores = caption_logprobs(model, layout, candidates, rows, sampling.batch_size)
    best = rearrange(scores, "(b n) -> b n", n=n).argmax(1)
    grouped = rearrange(candidates, "(b n) h w -> b n h w", n=n)
    return grouped[torch.arange(len(prompts), device=grouped.device), best.to(grouped.device)]


def rerank_captions(
    model: nn.Module, layout: VocabLayout, codes: Tensor, sampling: SamplingConfig
) -> list[list[int]]:
    """Noisy-channel self-reranking of captions for image codes [B, h, w].

    Candidates per image: the caption `sampling` decodes (greedy, beam or sampled) plus
    `rerank - 1` sampled ones (at `sampling.temperature` / top-k / top-p); the kept one has the
    highest log p(caption | image) + log p(image | caption), the second term from the same model
    read in the text-to-image direction (`image_logprobs`).
    """
    n, codes = sampling.rerank, torch.as_tensor(codes)
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
    score = caption_logprobs(model, layout, pairs, flat, sampling.batch_size)
    score = score + image_logprobs(model, layout, pairs, flat, sampling.batch_size)
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
    warning) so the sequence fits the model's n_positions. cfg_scale must be 1: there is no
    trained unconditional branch for captions.
    """
    sampling = sampling or SamplingConfig()
    codes = torch.as_tensor(codes)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != layout.grid:
        raise ValueError(
            f"codes must be [B, h, w] with (h, w) = {layout.grid}, got {tuple(codes.shape)}"
        )
    if sampling.cfg_scale != 1.0:
        raise ValueError("cfg_scale applies to text-to-image only; set it to 1 for captions")
    if sampling.rerank > 1:
        return rerank_captions(model, layout, codes, sampling)
    prompt_len = layout.tokens_per_image + 3  # eos boi codes eoi
    room = max_positions(model) - prompt_len
    if room < 1:
        raise ValueError(
            f"the model's n_positions={max_positions(model)} cannot hold an image prompt of "
            f"{prompt_len} tokens plus a caption"
        )
    max_new = sampling.max_new_tokens
    if max_new > room:
        warnings.warn(
            f"max_new_tokens={max_new} capped at {room}: n_positions={max_positions(model)} minus "
            f"the {prompt_len}-token image prompt",
            stacklevel=2,
        )
        max_new = room
    if codes.shape[0] == 0:
        return []
    device = next(model.parameters()).device
    allowed = text_token_mask(layout, _vocab_width(model), device)
    image_ids = rearrange(layout.codes_to_ids(codes), "b h w -> b (h w)").tolist()
    full = [[layout.eos_id, layout.boi_id, *ids, layout.eoi_id] for ids in image_ids]
    captions: list[list[int]] = []
    with _inference(model):
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
                model,
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
    "BeamOutput",
    "DecodeOutput",
    "SamplingConfig",
    "T2IPrompts",
    "beam_search",
    "caption_logprobs",
    "constrained_logprobs",
    "decode_loop",
    "generate_captions",
    "generate_image_codes",
    "guide",
    "image_logprobs",
    "image_token_mask",
    "last_logits",
    "max_positions",
    "narrow_head",
    "NarrowHead",
    "next_token_scores",
    "pick",
    "rerank_by_caption",
    "rerank_captions",
    "row_generators",
    "t2i_prefix_length",
    "t2i_prompts",
    "text_token_mask",
    "warp",
]
