"""Decoding loops over a KV cache: one prefill and step loop for both cache kinds, and beam search.

Prompts are left-padded to one length (`left_pad`); the attention mask hides the padding and
position ids count real tokens only, so a padded row sees what its unpadded run would. The prompt
is run once (`KVDecoder.start`), then one token per row per step (`KVDecoder.step`). The cache
kind is a parameter of the decoder, not a second loop:

  dynamic   a DynamicCache: every step appends one column to each layer's keys and values and
            grows the attention mask, so every step has new shapes; rows can be reordered
            (`select`, what beam search needs).
  static    a StaticCache sized prompt + new tokens - 1 up front and an attention mask of that
            full width written once (causality hides the columns not yet filled), positions in a
            tensor: every step has the same shapes and addresses, so `torch.compile(mode=
            "reduce-overhead")` captures the step as a CUDA graph and replays it. Compiled by
            default on CUDA, not elsewhere; the first call of each batch shape compiles, and the
            decoder keeps its cache and compiled step for the next call of that shape.

Both give the same tokens for the same seed: the same prompts, the same logits pipeline
(`vqgpt.lm.sampling`) and the same seeded `pick`. The static cache's logits equal the dynamic
one's to float rounding, not bitwise (attention sums over the static width instead of the filled
length), so a row could differ only where two tokens' scores are within ~1e-6.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

from vqgpt.lm.positions import ImagePositions, PositionTracker
from vqgpt.lm.sampling import (
    SamplingConfig,
    base_seed,
    constrained_logprobs,
    next_token_scores,
    pick,
    row_generators,
)

CACHE_KINDS = ("dynamic", "static")


class DecodeOutput(NamedTuple):
    """Tokens chosen by `decode_loop`."""

    tokens: Tensor  # [B, n] long; after a row's stop token, the rest is the stop id
    lengths: Tensor  # [B] long: tokens generated per row, its stop token included


class BeamOutput(NamedTuple):
    """Best hypothesis per prompt from `beam_search`."""

    sequences: list[list[int]]  # generated ids, without the stop token
    scores: Tensor  # [B] float: sum of constrained log-probs / length (stop token counted)


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
    with torch.no_grad():  # a copy of the rows, outside autograd
        columns = allowed.nonzero().squeeze(1).to(head.weight.device)
        bias = None if head.bias is None else head.bias[columns]
        return NarrowHead(columns, head.weight[columns], bias)


def last_logits(model: nn.Module, head: NarrowHead | None = None, **inputs) -> Tensor:
    """Next-token logits at each row's last position: [N, V], or [N, C] over `head.columns`."""
    if head is None:
        return model(**inputs, logits_to_keep=1).logits[:, -1]
    hidden = model.base_model(**inputs).last_hidden_state[:, -1]
    return F.linear(hidden, head.weight, head.bias)


def vocab_width(model: nn.Module) -> int:
    """Logit columns (the padded vocabulary)."""
    return model.get_output_embeddings().weight.shape[0]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Prompts -> (ids [N, T], mask [N, T]) left-padded to the longest (the last token is newest)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.as_tensor(list(prompt), device=device)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


class KVDecoder:
    """A model, its KV cache (`cache`: "dynamic" | "static", see the module docstring) and a batch
    of prompts in it: `start` runs the prompts, `step` feeds one token per row; both return the
    next-token logits [N, V], or [N, C] over `head.columns` with a `NarrowHead`.

    `compile` (static cache only; default: on CUDA) runs the step through `torch.compile`, as
    CUDA graphs on CUDA. Reuse one static decoder across calls: it keeps its cache and compiled
    step while the batch shape stays the same.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: str = "dynamic",
        head: NarrowHead | None = None,
        compile: bool | None = None,
    ) -> None:
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
        if compile and cache != "static":
            raise ValueError("compile needs cache='static' (a dynamic cache changes shape)")
        self.model = model
        self.kind = cache
        self.head = head
        self.device = next(model.parameters()).device
        self.compiled = cache == "static" and (
            self.device.type == "cuda" if compile is None else compile
        )
        self.cache_kwarg = _cache_kwarg(model)
        self.cache: DynamicCache | StaticCache | None = None
        self.shape: tuple[int, int] | None = None  # static: (rows, cache length) of `cache`
        self.mask: Tensor | None = None  # (N, L) long: 0 on left padding, 1 elsewhere
        # position ids of the fed tokens (sequential, or shared image positions: lm.positions)
        self.tracker = PositionTracker(ImagePositions.of(model.config))
        self.logits: Tensor | None = None  # (N, V) after the last start / step / select
        self._step = self._forward
        if self.compiled:
            cuda_graphs = self.device.type == "cuda"
            self._step = torch.compile(
                self._forward, mode="reduce-overhead" if cuda_graphs else None, dynamic=False
            )

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        return last_logits(
            self.model,
            self.head,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},  # updated in place
        )

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int, new_tokens: int) -> Tensor:
        """Prefill (eager) the left-padded prompts, with room for `new_tokens` more."""
        ids, prompt_mask = left_pad(prompts, pad_id, self.device)
        n, t = ids.shape
        if self.kind == "dynamic":
            self.cache = DynamicCache(config=self.model.config)
            self.mask = prompt_mask  # grows by one column per step
        else:
            length = t + max(new_tokens - 1, 0)  # the last new token is never fed back
            if self.shape != (n, length):
                self.cache = StaticCache(config=self.model.config, max_cache_len=length)
                self.shape = (n, length)
            else:
                self.cache.reset()  # same tensors (addresses) as the captured graph
            self.mask = torch.ones(n, length, dtype=torch.long, device=self.device)
            self.mask[:, :t] = prompt_mask
        positions = self.tracker.start(ids, prompt_mask)  # (N, T), from 0
        self.logits = self._forward(ids, positions, self.mask)
        return self.logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token [N] per row; next-token logits (a copy when compiled)."""
        if self.kind == "dynamic":
            self.mask = F.pad(self.mask, (0, 1), value=1)
        elif self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        positions = self.tracker.next(tokens)  # (N, 1)
        logits = self._step(rearrange(tokens, "n -> n 1"), positions, self.mask)
        self.logits = logits.clone() if self.compiled else logits
        return self.logits

    def select(self, index: Tensor) -> None:
        """Keep / reorder / repeat rows: row i becomes old row index[i] (dynamic cache only)."""
        if self.kind != "dynamic":
            raise ValueError("select reorders a dynamic cache; a static one keeps its rows")
        self.cache.reorder_cache(index)  # index_select on every layer's keys and values
        self.mask = self.mask[index]
        self.tracker.select(index)
        self.logits = self.logits[index]


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
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
    decoder: KVDecoder,
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
    """Greedy or sampled decoding of up to `max_new_tokens` tokens from `allowed` ids [V].

    Rows stop at `stop_id` (None: run all `max_new_tokens` steps, with no host sync per step).
    With `uncond_prompts` (one per prompt) the unconditional rows run in the same batch and every
    step samples from `u + cfg_scale * (c - u)`, appending the token to both rows. `row_ids` seed
    the per-row generators (default 0..B-1). The last token is never fed back: nothing reads its
    logits.
    """
    n = len(prompts)
    guided = uncond_prompts is not None
    if guided and len(uncond_prompts) != n:
        raise ValueError(f"{len(uncond_prompts)} unconditional prompts for {n} prompts")
    row_ids = list(range(n)) if row_ids is None else list(row_ids)
    if len(row_ids) != n:
        raise ValueError(f"{len(row_ids)} row ids for {n} prompts")
    logits = decoder.start([*prompts, *(uncond_prompts or [])], pad_id, max_new_tokens)
    device, head = logits.device, decoder.head
    if head is not None:  # logits cover the allowed ids only: column j is id head.columns[j]
        allowed = torch.ones(len(head.columns), dtype=torch.bool)
    allowed = allowed.to(device)
    generators = None
    if sampling.do_sample:
        generators = row_generators(base_seed(sampling), row_ids, device)
    fill = pad_id if stop_id is None else stop_id
    tokens = torch.full((n, max_new_tokens), fill, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    running = torch.ones(n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scores = next_token_scores(logits, allowed, sampling, guided)  # (n, V or C)
        picked = pick(scores, sampling, generators)
        if head is not None:
            picked = head.columns[picked]
        chosen = torch.where(running, picked, fill)
        tokens[:, t] = chosen
        lengths += running.long()
        if stop_id is not None:
            running &= chosen != stop_id
        if t == max_new_tokens - 1 or (stop_id is not None and not running.any()):
            break
        logits = decoder.step(torch.cat([chosen, chosen]) if guided else chosen)
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
    session = KVDecoder(model, cache="dynamic")
    session.start(prompts, pad_id, max_new_tokens)
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


__all__ = [
    "CACHE_KINDS",
    "BeamOutput",
    "DecodeOutput",
    "KVDecoder",
    "NarrowHead",
    "beam_search",
    "decode_loop",
    "inference",
    "last_logits",
    "left_pad",
    "max_positions",
    "narrow_head",
    "vocab_width",
]
