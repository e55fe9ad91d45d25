"""Fast text-to-image sampling: a static KV cache and a compiled one-token step (CUDA graphs).

`FastImageSampler(model, layout)(prompts, sampling)` returns the same codes as
`vqgpt.lm.generate.generate_image_codes(model, layout, prompts, sampling)`: same prompts, same
left padding and position ids, same CFG batching (conditional and unconditional rows in one
forward), same logits pipeline (`next_token_scores`) and the same per-row seeded Gumbel-max
`pick`. What changes is how each step runs:

  plain   DynamicCache: every step concatenates one column to each layer's keys and values and
          grows the attention mask, so every step has new shapes; one host sync per step.
  fast    StaticCache sized prompt + h*w - 1 up front, an attention mask of that full width
          written once (causality hides the columns not yet filled), positions in a tensor: every
          step has the same shapes and addresses, so `torch.compile(mode="reduce-overhead")`
          captures the step as a CUDA graph and replays it; no host sync inside the loop.

Equality: greedy decoding gives the plain path's tokens, and sampling the same tokens for the same
seed, because both paths feed identical scores to the same `pick`. The logits themselves agree to
float rounding, not bitwise (attention sums over the static width instead of the filled length),
so a row could differ only where two tokens' scores are within ~1e-6: the tests pin equality on a
tiny model and the benchmark counts identical images.

Compilation is on by default on CUDA and off elsewhere (`compile=None`); `compile=True` on the CPU
uses inductor's default mode (no CUDA graphs). The first call of each batch shape compiles (tens
of seconds on a GPU); the sampler keeps its cache and compiled step for the next call of that
shape, so reuse one sampler across calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import StaticCache

from vqgpt.lm.generate import (
    DecodeOutput,
    NarrowHead,
    SamplingConfig,
    _base_seed,
    _cache_kwarg,
    _chunks,
    _inference,
    _vocab_width,
    image_token_mask,
    last_logits,
    narrow_head,
    next_token_scores,
    pick,
    rerank_by_caption,
    row_generators,
    t2i_prompts,
)
from vqgpt.lm.vocab import VocabLayout


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


class StaticDecoder:
    """A model's static KV cache and one-token step; reused while the batch shape stays the same."""

    def __init__(
        self, model: nn.Module, compile: bool | None = None, head: NarrowHead | None = None
    ) -> None:
        self.model = model
        self.head = head  # logits over head.columns only (see `vqgpt.lm.generate.narrow_head`)
        self.device = next(model.parameters()).device
        self.compiled = self.device.type == "cuda" if compile is None else compile
        self.cache_kwarg = _cache_kwarg(model)
        self.cache: StaticCache | None = None
        self.shape: tuple[int, int] | None = None  # (rows, cache length) of `cache`
        self.mask: Tensor | None = None  # (N, L) long: 0 on left padding, 1 elsewhere
        self.positions: Tensor | None = None  # (N, 1): position id of the next token
        self._step = self._forward_step
        if self.compiled:
            cuda_graphs = self.device.type == "cuda"
            self._step = torch.compile(
                self._forward_step, mode="reduce-overhead" if cuda_graphs else None, dynamic=False
            )

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        return last_logits(  # (N, V), or (N, C) over self.head.columns
            self.model,
            self.head,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},  # updated in place
        )

    def _forward_step(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        return self._forward(tokens, positions, mask)

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int, new_tokens: int) -> Tensor:
        """Prefill (eager) the prompts with room for `new_tokens`; next-token logits [N, V]."""
        ids, prompt_mask = left_pad(prompts, pad_id, self.device)
        (n, t), length = ids.shape, ids.shape[1] + max(new_tokens - 1, 0)  # last token not fed
        if self.shape != (n, length):
            self.cache = StaticCache(config=self.model.config, max_cache_len=length)
            self.shape = (n, length)
        else:
            self.cache.reset()  # same tensors (addresses) as the captured graph
        self.mask = torch.ones(n, length, dtype=torch.long, device=self.device)
        self.mask[:, :t] = prompt_mask
        self.positions = rearrange(prompt_mask.sum(dim=-1), "n -> n 1")  # real tokens so far
        positions = (prompt_mask.cumsum(dim=-1) - 1).clamp_min(0)  # (N, T)
        return self._forward(ids, positions, self.mask)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token [N] per row; next-token logits [N, V] (a copy, safe across steps)."""
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        logits = self._step(rearrange(tokens, "n -> n 1"), self.positions, self.mask)
        self.positions = self.positions + 1
        return logits.clone() if self.compiled else logits


def static_decode_loop(
    decoder: StaticDecoder,
    prompts: Sequence[Sequence[int]],
    allowed: Tensor,
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    pad_id: int,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    row_ids: Sequence[int] | None = None,
) -> DecodeOutput:
    """`vqgpt.lm.generate.decode_loop` without a stop token, on the static cache: exactly
    `max_new_tokens` tokens per row, CFG rows batched with the conditional ones."""
    n = len(prompts)
    guided = uncond_prompts is not None
    if guided and len(uncond_prompts) != n:
        raise ValueError(f"{len(uncond_prompts)} unconditional prompts for {n} prompts")
    row_ids = list(range(n)) if row_ids is None else list(row_ids)
    if len(row_ids) != n:
        raise ValueError(f"{len(row_ids)} row ids for {n} prompts")
    logits = decoder.start([*prompts, *(uncond_prompts or [])], pad_id, max_new_tokens)
    device = logits.device
    head = decoder.head
    if head is not None:  # logits cover head.columns: every column is allowed
        allowed = torch.ones(len(head.columns), dtype=torch.bool)
    allowed = allowed.to(device)
    generators = None
    if sampling.do_sample:
        generators = row_generators(_base_seed(sampling), row_ids, device)
    tokens = torch.empty(n, max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        scores = next_token_scores(logits, allowed, sampling, guided)  # (n, V)
        chosen = pick(scores, sampling, generators)
        if head is not None:
            chosen = head.columns[chosen]
        tokens[:, t] = chosen
        if t < max_new_tokens - 1:
            logits = decoder.step(torch.cat([chosen, chosen]) if guided else chosen)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    return DecodeOutput(tokens, lengths)


class FastImageSampler:
    """Text-to-image codes like `generate_image_codes`, through a `StaticDecoder` (see module doc)."""

    def __init__(self, model: nn.Module, layout: VocabLayout, compile: bool | None = None) -> None:
        self.model = model
        self.layout = layout
        device = next(model.parameters()).device
        allowed = image_token_mask(layout, _vocab_width(model), device)
        self.decoder = StaticDecoder(model, compile, narrow_head(model, allowed))

    def __call__(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None
    ) -> Tensor:
        """Codes [B, h, w] in [0, K) for caption ids (GPT-2 ids without specials; [] = none)."""
        sampling = sampling or SamplingConfig()
        layout, model = self.layout, self.model
        h, w = layout.grid
        if sampling.rerank > 1:
            return rerank_by_caption(model, layout, prompts, sampling, self)
        t2i = t2i_prompts(model, layout, prompts, sampling)
        if not prompts:
            return torch.empty(0, h, w, dtype=torch.long, device=self.decoder.device)
        allowed = image_token_mask(layout, _vocab_width(model), self.decoder.device)
        full, uncond = t2i.prompts, t2i.uncond_prompt
        codes = []
        with _inference(model):
            for part in _chunks(len(full), sampling.batch_size):
                batch = full[part]
                out = static_decode_loop(
                    self.decoder,
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


__all__ = ["FastImageSampler", "StaticDecoder", "left_pad", "static_decode_loop"]
