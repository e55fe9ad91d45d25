"""The per-step logits pipeline of decoding: allowed ids, guidance, filters, seeded draws.

Every decoding step (`vqgpt.lm.decoding`) turns the model's next-token logits into a choice in
one place, `next_token_scores` then `pick`:
1. mask the disallowed ids (the other modality, special tokens, the model's padded embedding
   rows) to -inf and renormalise over the allowed ones (`constrained_logprobs`);
2. classifier-free guidance on those log-probs, `u + scale * (c - u)` (`guide`);
3. temperature, then top-k, then top-p (`warp`; sampling only, they never change an argmax);
4. argmax, or a draw by the Gumbel-max trick with the row's own generator (`pick`).

Randomness: row i of a call (its index in the prompt list) samples with its own generator seeded
from (seed, i) (`row_generators`). A row's tokens therefore depend on the seed and its index, not
on `batch_size` or the other prompts, except where a different batch shape changes
floating-point rounding enough to flip a near-tie. Greedy and beam search use no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vqgpt.config import ConfigError
from vqgpt.lm.vocab import VocabLayout

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingConfig:
    """How tokens are chosen: sampling filters, guidance, seed, beams, batching.

    These field defaults are vqgpt's one set of sampling defaults: the CLI (`vqgpt generate`,
    `caption`, `eval`), the held-out evaluation and the demo take every value they do not set
    from here. Temperature 0.5 and CFG 1.5 were measured best for text-to-image on the demo's LM
    (docs/results.md: CFG 1.5 beat 1 and 3, temperature 0.5 beat 1.0).
    """

    temperature: float = 0.5  # divides the log-probs; sampling only
    top_k: int = 0  # keep the k most likely tokens (0 = off); sampling only
    top_p: float = 1.0  # keep the smallest set with this much mass (1 = off); sampling only
    # text-to-image guidance: u + s * (c - u); 1 = off, 0 = unconditional. Captions ignore it:
    # no unconditional branch is trained for them
    cfg_scale: float = 1.5
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


def base_seed(sampling: SamplingConfig) -> int:
    """The configured seed, or one drawn from torch's global RNG."""
    if sampling.seed is not None:
        return sampling.seed
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


__all__ = [
    "SamplingConfig",
    "base_seed",
    "constrained_logprobs",
    "guide",
    "image_token_mask",
    "next_token_scores",
    "pick",
    "row_generators",
    "text_token_mask",
    "warp",
]
