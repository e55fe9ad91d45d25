"""Vector quantizer: nearest-code search, EMA codebooks, k-means init, dead-code restarts, RVQ.

Math (docs/design.md, "Quantizer math"): `z_q = e[k]`, `k = argmin_i ||z_e - e_i||^2`; codebook
loss `||sg[z_e] - z_q||^2` (replaced by EMA updates when `ema` is on); commitment
`||z_e - sg[z_q]||^2` weighted by `beta`; the gradient crosses the code step by `estimator`:
straight-through `z_q = z_e + (z_q - z_e).detach()` or the rotation trick (`estimators.py`;
residual VQ: once, from z_e onto the sum of its codes). All arithmetic runs in float32.

Multi-process: when `torch.distributed` is initialised, every codebook change made in a training
forward is identical on all ranks, and equal to what one process with the whole global batch
would make: EMA statistics and code counts are all-reduced; k-means init and restart choices are
made on rank 0 from every rank's rows (gathered in rank order, i.e. in the order of the global
batch) and broadcast. This holds whether or not DDP also broadcasts buffers, so every rank must
run the training forward the same number of times with the same number of rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgpt.config import ConfigError
from vqgpt.export.hub import configuration_vqgpt as hub_config
from vqgpt.export.hub import quantization_vqgpt as hub
from vqgpt.tokenizer.entropy import batch_entropy, soft_assignment
from vqgpt.tokenizer.estimators import ESTIMATORS, apply_estimator

# ---------------------------------------------------------------------------------------------
# config

QUANTIZER_PRESETS: dict[str, dict[str, Any]] = {
    # The seed write-up's VectorQuantizer: gradient-trained codebook, uniform(-1/K, 1/K) init.
    "seed": dict(
        ema=False,
        kmeans_init=False,
        restart_after_steps=0,
        l2_normalize=False,
        codebook_dim=None,
        num_quantizers=1,
        init="uniform",
    ),
    # What we recommend: EMA codebook, k-means init, dead-code restarts.
    "default": dict(ema=True, kmeans_init=True, restart_after_steps=20, init="normal"),
}


# how re-seeded codes are drawn from a step's vectors (QuantizerConfig.dead_code_sampling)
DEAD_CODE_SAMPLING = ("error", "uniform")

# Fields each family reads beyond COMMON_FIELDS. A family that does not read a field needs it at
# its default (a non-default value is a ConfigError naming it): the VQ codebook upkeep (EMA,
# k-means, restarts, init) is on by default and simply unused by simvq, fsq and lfq.
COMMON_FIELDS = frozenset({"type", "codebook_size", "codebook_dim", "bypass_steps"})
_VQ_SEARCH = {"beta", "estimator", "chunk_size"}
FAMILY_FIELDS: dict[str, frozenset[str]] = {
    "vq": frozenset(
        _VQ_SEARCH
        | {"preset", "l2_normalize", "num_quantizers", "init", "ema", "ema_decay", "ema_eps"}
        | {"kmeans_init", "kmeans_iters", "restart_after_steps", "dead_code_threshold"}
        | {"dead_code_sampling", "diversity_weight", "diversity_temperature"}
        | {"diversity_decay_steps"}
    ),
    "simvq": frozenset(_VQ_SEARCH),  # frozen random codebook, learnt linear map (simvq.py)
    "fsq": frozenset({"fsq_levels"}),  # no codebook, no auxiliary loss (fsq.py)
    "lfq": frozenset({"beta", "chunk_size", "entropy_weight", "entropy_temperature"}),  # lfq.py
}


@dataclass
class QuantizerConfig:
    """Quantizer options (math in docs/design.md, "Quantizer math"; families in "Quantizer
    families"): `type` picks vq | simvq | fsq | lfq, each reads the fields of FAMILY_FIELDS.

    Raises ConfigError (one line, naming the key) on a bad value, a field the family does not
    read set away from its default, fsq_levels whose product is not codebook_size, an lfq
    codebook_size that is not a power of two, or (`check_code_dim`) a code dim that does not fit.
    """

    PRESETS: typing.ClassVar[dict[str, dict[str, Any]]] = QUANTIZER_PRESETS
    RENAMED: typing.ClassVar[dict[str, str]] = hub_config.RENAMED_QUANTIZER_KEYS  # 0.1 names

    preset: str | None = None  # "seed" | "default": fills the fields it names, explicit keys win
    type: str = "vq"  # the family: "vq" | "simvq" | "fsq" | "lfq" (FAMILY_FIELDS)
    codebook_size: int = 1024  # K (fsq: prod(fsq_levels); lfq: 2^d, d the code dim)
    codebook_dim: int | None = None  # factorised codes: project to this dim and search there
    l2_normalize: bool = False  # search / store l2-normalised codes (cosine similarity)
    beta: float = 0.25  # commitment weight
    estimator: str = "ste"  # gradient across the code step: "ste" | "rotation" (estimators.py)
    num_quantizers: int = 1  # residual quantisation depth: codes per position (RVQ)
    init: str = "normal"  # "uniform" (seed: U(-1/K, 1/K)) | "normal"
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the cluster sizes
    kmeans_init: bool = True  # k-means on the first training batch
    kmeans_iters: int = 10
    restart_after_steps: int = 20  # a code unused this many steps is re-seeded (0 = never)
    # a code whose EMA cluster size (assignments per step, averaged with ema_decay) falls below
    # this is re-seeded too (0 = never; needs ema): SoundStream's rule, vector-quantize-pytorch's
    # `threshold_ema_dead_code` (2 in its examples: with as many vectors per step as 2K, every code
    # used less than the average is replaced)
    dead_code_threshold: float = 0.0
    # how a re-seeded code's new value is drawn from the step's encoder outputs: "error" (each
    # vector with probability proportional to its squared quantization error: the badly served
    # ones) or "uniform" (every vector alike: vector-quantize-pytorch's `sample_vectors`)
    dead_code_sampling: str = "error"
    bypass_steps: int = 0  # first training steps decode z_e itself (no quantizer); k-means after
    chunk_size: int = 256  # rows of the search per chunk: peak memory O(chunk_size * K); see
    # scripts/bench_quantizer.py (small blocks stay in cache: faster than bigger ones on CPU)
    # fsq: values per code dim, each >= 2 ("levels" in the paper; 0.1 read `levels` as
    # num_quantizers, and still does)
    fsq_levels: tuple[int, ...] | None = None
    entropy_weight: float = 0.1  # lfq: weight of the entropy penalty E[H(q(z))] - H(E[q(z)])
    entropy_temperature: float = 0.01  # lfq: T of q(c | z) = softmax_c(-||z - c||^2 / T)
    # vq: weight of the codebook diversity loss log K - H(E_n[p_n]), p_n = softmax_c(-||z_n - c||^2
    # / T) with T = diversity_temperature (entropy.py): the batch term of MAGVIT-v2's entropy
    # penalty (vector-quantize-pytorch's `codebook_diversity_loss_weight` has the same aim, with
    # another formula: docs/design.md); 0 = off
    diversity_weight: float = 0.0
    diversity_temperature: float = 1.0  # vq: T above, in squared search-space distance
    # vq: the diversity weight falls linearly from diversity_weight to 0 over this many training
    # steps after the warm-up (bypass_steps), and the loss is off after them; 0 = constant (an
    # annealed entropy weight as MAGVIT's `entropy_loss_annealing_steps`, down to 0 here)
    diversity_decay_steps: int = 0

    def __post_init__(self) -> None:
        # presets are expanded by `from_dict`, before the fields are set
        if self.preset is not None and self.preset not in QUANTIZER_PRESETS:
            raise ConfigError(
                f"quantizer preset {self.preset!r} is unknown; known: {sorted(QUANTIZER_PRESETS)}"
            )
        if self.codebook_size < 2:
            raise ConfigError("quantizer.codebook_size must be at least 2")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ConfigError("quantizer.codebook_dim must be positive or null")
        if self.num_quantizers < 1:
            raise ConfigError("quantizer.num_quantizers must be at least 1")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"quantizer.estimator={self.estimator!r} is unknown; known: {list(ESTIMATORS)} "
                "(ste: straight-through; rotation: the rotation trick, Fifty et al. 2025)"
            )
        if self.init not in ("uniform", "normal"):
            raise ConfigError("quantizer.init must be 'uniform' or 'normal'")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("quantizer.ema_decay must be in (0, 1)")
        if self.chunk_size < 1:
            raise ConfigError("quantizer.chunk_size must be positive")
        if self.bypass_steps < 0:
            raise ConfigError("quantizer.bypass_steps must be >= 0")
        if self.restart_after_steps < 0:
            raise ConfigError("quantizer.restart_after_steps must be >= 0")
        if self.dead_code_threshold < 0:
            raise ConfigError("quantizer.dead_code_threshold must be >= 0")
        if self.dead_code_sampling not in DEAD_CODE_SAMPLING:
            raise ConfigError(
                f"quantizer.dead_code_sampling={self.dead_code_sampling!r} is unknown; known: "
                f"{list(DEAD_CODE_SAMPLING)}"
            )
        if not math.isfinite(self.diversity_weight) or self.diversity_weight < 0:
            raise ConfigError("quantizer.diversity_weight must be a finite number >= 0")
        if not math.isfinite(self.diversity_temperature) or self.diversity_temperature <= 0:
            raise ConfigError("quantizer.diversity_temperature must be a finite number > 0")
        if self.diversity_decay_steps < 0:
            raise ConfigError("quantizer.diversity_decay_steps must be >= 0 (0 = constant)")
        if self.dead_code_threshold > 0 and not self.ema:
            raise ConfigError(
                "quantizer.dead_code_threshold needs ema: true (it reads the EMA cluster sizes)"
            )
        self._check_family()
        if self.diversity_decay_steps and not self.diversity_weight:
            raise ConfigError(
                "quantizer.diversity_decay_steps decays quantizer.diversity_weight, which is 0 "
                "(off); set a weight or leave the decay at 0"
            )

    def _check_family(self) -> None:
        """The `type`: known, its own fields valid, every field it does not read at its default."""
        if self.type not in FAMILY_FIELDS:
            raise ConfigError(
                f"quantizer.type={self.type!r} is unknown; known: {list(FAMILY_FIELDS)}"
            )
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name in COMMON_FIELDS or f.name in FAMILY_FIELDS[self.type] or value == default:
                continue
            readers = [t for t, names in FAMILY_FIELDS.items() if f.name in names]
            raise ConfigError(
                f"quantizer.{f.name}={value!r} means nothing for quantizer.type={self.type!r} "
                f"(only {', '.join(readers)} read it); remove it"
            )
        if self.type == "fsq":
            levels = self.fsq_levels
            if not levels or any(not isinstance(n, int) or n < 2 for n in levels):
                raise ConfigError(
                    f"quantizer.type='fsq' needs quantizer.fsq_levels, a list of ints >= 2 (values per "
                    f"code dim, e.g. [8, 5, 5, 5]); got {levels!r}"
                )
            if math.prod(levels) != self.codebook_size:
                raise ConfigError(
                    f"quantizer.codebook_size={self.codebook_size} but fsq_levels {list(levels)} "
                    f"give K = prod(levels) = {math.prod(levels)}; set codebook_size to that"
                )
        if self.type == "lfq":
            d = self.codebook_size.bit_length() - 1
            if self.codebook_size != 2**d:
                raise ConfigError(
                    f"quantizer.type='lfq' needs codebook_size = 2^d (d the code dim); "
                    f"{self.codebook_size} is not a power of two"
                )
            if not math.isfinite(self.entropy_weight) or self.entropy_weight < 0:
                raise ConfigError("quantizer.entropy_weight must be a finite number >= 0")
            if not math.isfinite(self.entropy_temperature) or self.entropy_temperature <= 0:
                raise ConfigError("quantizer.entropy_temperature must be a finite number > 0")
        if self.codebook_dim is not None:
            self.check_code_dim(None)

    def check_code_dim(self, latent_dim: int | None) -> None:
        """Raise ConfigError unless the code dim (`codebook_dim`, else `latent_dim`: the encoder's
        channels, model.latent_dim) fits the family: fsq len(fsq_levels), lfq log2(codebook_size)."""
        dim = self.codebook_dim if self.codebook_dim is not None else latent_dim
        if dim is None or self.type not in ("fsq", "lfq"):
            return
        where = "quantizer.codebook_dim" if self.codebook_dim is not None else "model.latent_dim"
        if self.type == "fsq" and dim != len(self.fsq_levels or ()):
            levels = list(self.fsq_levels or ())
            need, why = len(levels), f"len(fsq_levels) for fsq_levels {levels}"
        elif self.type == "lfq" and 2**dim != self.codebook_size:
            need = self.codebook_size.bit_length() - 1
            why = f"log2(codebook_size) for lfq with codebook_size {self.codebook_size}"
        else:
            return
        raise ConfigError(
            f"the code dim is {where}={dim} but must be {need} = {why}; set "
            f"quantizer.codebook_dim: {need} (a projection) or model.latent_dim: {need}"
        )

    def diversity_weight_at(self, step: int) -> float:
        """The diversity loss's weight at training step `step` (0-based, the warm-up's included):
        `diversity_weight` constant, or with `diversity_decay_steps` = S, falling linearly from
        it at the first step after the warm-up to 0 at S steps after it (0 from then on)."""
        if not self.diversity_decay_steps:
            return self.diversity_weight
        after_warmup = max(step - self.bypass_steps, 0)
        return self.diversity_weight * max(1.0 - after_warmup / self.diversity_decay_steps, 0.0)


# ---------------------------------------------------------------------------------------------
# helpers


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _dist_ready() or dist.get_rank() == 0


def _all_reduce_sum_(t: Tensor) -> Tensor:
    if _dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_(t: Tensor) -> Tensor:
    if _dist_ready():
        dist.broadcast(t, src=0)
    return t


def _gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of `t` (the same shape on each), concatenated in rank order: the rows one
    process would hold with the whole global batch. `t` itself without a process group."""
    if not _dist_ready() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# nearest-code search


SEARCH_BACKENDS = ("auto", "chunked", "triton")
SEARCH_BACKEND_ENV = "VQGPT_NEAREST_CODE"  # forces a backend of `nearest_code` (tests, benchmarks)


class SearchBackend(NamedTuple):
    name: str  # "chunked" | "triton"
    forced: bool  # asked for by name (argument or environment), not picked by "auto"


# Why the Triton kernel is off for the rest of this process ("" while it has not failed): a GPU
# whose compiler or driver cannot build or launch it falls back once, with one warning.
_triton_failure = ""


def _search_backend(x: Tensor, backend: str | None) -> SearchBackend:
    """`backend`, else $VQGPT_NEAREST_CODE, else auto: triton on CUDA for D <= KERNEL_MAX_DIM
    when importable (and not failed before in this process)."""
    backend = backend or os.environ.get(SEARCH_BACKEND_ENV) or "auto"
    if backend not in SEARCH_BACKENDS:
        raise ValueError(
            f"nearest-code backend {backend!r} is unknown (argument or ${SEARCH_BACKEND_ENV}); "
            f"known: {list(SEARCH_BACKENDS)}"
        )
    if backend == "auto":
        return SearchBackend("triton" if _auto_picks_triton(x) else "chunked", forced=False)
    return SearchBackend(backend, forced=True)


def _auto_picks_triton(x: Tensor) -> bool:
    """Whether "auto" takes the kernel: it has not failed in this process and can run here."""
    return not _triton_failure and _kernel_can_run(x)


# "auto" takes the kernel up to this code dim: beyond it cuBLAS's float32 matmul in the chunked
# search wins (H200, N = 65,536, K = 16,384: D = 64 kernel 8.2 ms vs chunked 15.0; D = 128 14.5
# vs 11.3; D = 256 26.5 vs 16.8; docs/benchmarks.md)
KERNEL_MAX_DIM = 64


def _kernel_can_run(x: Tensor) -> bool:
    """CUDA tensors of at most KERNEL_MAX_DIM columns and triton importable (find_spec: CPU runs
    never pay for importing it)."""
    return (
        x.is_cuda
        and x.shape[1] <= KERNEL_MAX_DIM
        and importlib.util.find_spec("triton") is not None
    )


def _triton_failed(err: Exception) -> None:
    """Turn the kernel off for this process, with one warning saying why and what runs instead."""
    global _triton_failure
    lines = str(err).strip().splitlines()
    _triton_failure = f"{type(err).__name__}: {lines[0] if lines else ''}"
    warnings.warn(
        f"the Triton nearest-code kernel failed to compile or launch ({_triton_failure}); "
        "using the chunked search from now on (same codes, slower). "
        f"Set {SEARCH_BACKEND_ENV}=chunked to skip the kernel.",
        RuntimeWarning,
        stacklevel=3,
    )


def unsnapped(
    z_e: Tensor,
    proj_in: nn.Module | None,
    proj_out: nn.Module | None,
    l2_normalize: bool = False,
    squash: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """A quantizer's forward path with the snapping left out: `z_e` [B, D, H, W] -> projection in,
    l2 normalisation and `squash` (FSQ's bound) when given, projection out -> [B, D, H, W] in
    z_e's dtype (float32 inside). What the bypass warm-up decodes, so that the factorised
    projections train before the first code is drawn; `z_e` itself when there is nothing to
    apply (plain codes: the warm-up as it always was, bit for bit)."""
    if proj_in is None and proj_out is None and not l2_normalize and squash is None:
        return z_e
    b, _, h, w = z_e.shape
    with torch.autocast(device_type=z_e.device.type, enabled=False):
        z = hub.search_space(z_e, proj_in, l2_normalize)  # (N, search_dim)
        out = hub.project(squash(z) if squash is not None else z, proj_out)
    return rearrange(out, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z_e.dtype)


@torch.no_grad()
def nearest_code(
    x: Tensor, codebook: Tensor, chunk_size: int, backend: str | None = None
) -> Tensor:
    """Index [N] of the nearest codebook row [K, D] for each row of `x` [N, D].

    The chunked search an export ships (`vqgpt.export.hub.quantization_vqgpt.nearest_code`: `||x||^2`
    dropped, peak extra memory one `[chunk_size, K]` block, ties to the lowest index), or on CUDA
    with triton importable and D <= KERNEL_MAX_DIM (64) the fused kernel
    `vqgpt.tokenizer.kernels.nearest_code_triton` (exact float32); `backend` ("auto" | "chunked" | "triton") or $VQGPT_NEAREST_CODE forces one.
    When "auto" picked the kernel and it fails to compile or launch (an old GPU, a broken
    triton install), this call and every later one use the chunked search, after one
    RuntimeWarning; a forced "triton" raises instead.

    Raises:
        ValueError: x or codebook not 2-D, their widths differ, or chunk_size < 1.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code needs x [N, D] and codebook [K, D]; got {tuple(x.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    choice = _search_backend(x, backend)
    if choice.name == "triton":
        try:
            from vqgpt.tokenizer.kernels import nearest_code_triton

            return nearest_code_triton(x, codebook)
        except Exception as err:  # compile errors, out of resources, launch failures, imports
            if choice.forced:
                raise
            _triton_failed(err)
    return hub.nearest_code(x, codebook, chunk_size)


@torch.no_grad()
def nearest_code_full(x: Tensor, codebook: Tensor) -> Tensor:
    """The seed's naive search: the full `[N, K]` matrix `x^2 + e^2 - 2 x e^T`, then argmin."""
    distances = (
        torch.sum(x**2, dim=1, keepdim=True)
        + torch.sum(codebook**2, dim=1)
        - 2 * torch.matmul(x, codebook.t())
    )  # (N, K)
    return torch.argmin(distances, dim=1)


@torch.no_grad()
def kmeans(
    x: Tensor, k: int, iters: int, cosine: bool = False, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on rows of `x`: returns (centroids [k, D], counts [k]).

    Starts from `k` random rows (with replacement when there are fewer than `k`); an empty
    cluster keeps its centroid. `cosine` renormalises centroids each step (spherical k-means).
    """
    n = x.shape[0]
    if n >= k:
        start = torch.randperm(n, device=x.device)[:k]
    else:
        start = torch.randint(n, (k,), device=x.device)
    centroids = x[start].clone()
    for _ in range(iters):
        codes = nearest_code(x, centroids, chunk_size)
        counts = torch.bincount(codes, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        means = sums / counts.clamp(min=1.0)[:, None]
        if cosine:
            means = hub.l2norm(means)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    counts = torch.bincount(nearest_code(x, centroids, chunk_size), minlength=k).to(x.dtype)
    return centroids, counts


# ---------------------------------------------------------------------------------------------
# one codebook


class Codebook(nn.Module):
    """One level's K codes in search space, with its EMA / k-means / restart state."""

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.codebook_size
        embed = torch.empty(k, dim)
        if cfg.init == "uniform":
            embed.uniform_(-1.0 / k, 1.0 / k)  # the seed's init
        else:
            embed.normal_()
        if cfg.l2_normalize:
            embed = hub.l2norm(embed)
        if cfg.ema:
            self.register_buffer("embed", embed)
            # state as if each code had been seen once at its current value
            self.register_buffer("ema_cluster_size", torch.ones(k))
            self.register_buffer("ema_embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        if cfg.restart_after_steps > 0:
            self.register_buffer("unused_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))

    @property
    def vectors(self) -> Tensor:
        """The [K, dim] codes in float32, unit-norm when `l2_normalize`."""
        embed = self.embed.float()
        return hub.l2norm(embed) if self.cfg.l2_normalize else embed

    def search(self, x: Tensor) -> Tensor:
        """Nearest code for each row of `x` [N, dim]."""
        return nearest_code(x.detach(), self.vectors.detach(), self.cfg.chunk_size)

    @torch.no_grad()
    def kmeans_init_(self, x: Tensor) -> None:
        """Set the codes by k-means on `x` (every rank's rows; computed on rank 0, broadcast)."""
        k = self.cfg.codebook_size
        x = _gather_rows(x)
        centroids = torch.empty(k, x.shape[1], device=x.device)
        counts = torch.empty(k, device=x.device)
        if _is_rank0():
            centroids, counts = kmeans(
                x, k, self.cfg.kmeans_iters, self.cfg.l2_normalize, self.cfg.chunk_size
            )
        _broadcast_(centroids)
        _broadcast_(counts)
        self.embed.data.copy_(centroids)
        if self.cfg.ema:
            # an empty cluster counts as seen once, so its code survives the Laplace smoothing
            size = counts.clamp(min=1.0)
            self.ema_cluster_size.copy_(size)
            self.ema_embed_sum.copy_(centroids * size[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_(self, x: Tensor, codes: Tensor) -> None:
        """Training-step update from rows `x` [N, dim] assigned to `codes`: EMA, then restarts."""
        cfg = self.cfg
        if not (cfg.ema or self.restarts):
            return
        k = cfg.codebook_size
        # one all-reduce for counts (and, for EMA, sums): [K, 1 (+ dim)]
        stats = torch.zeros(k, 1 + (x.shape[1] if cfg.ema else 0), device=x.device)
        stats[:, 0].index_add_(0, codes, torch.ones_like(codes, dtype=stats.dtype))
        if cfg.ema:
            stats[:, 1:].index_add_(0, codes, x)
        _all_reduce_sum_(stats)
        counts, sums = stats[:, 0], stats[:, 1:]
        if cfg.ema:
            self._ema_step_(counts, sums)
        if self.restarts:
            self._restart_dead_(x, codes, counts)

    def _ema_step_(self, counts: Tensor, sums: Tensor) -> None:
        decay, eps, k = self.cfg.ema_decay, self.cfg.ema_eps, self.cfg.codebook_size
        size = self.ema_cluster_size.float() * decay + counts * (1 - decay)
        embed_sum = self.ema_embed_sum.float() * decay + sums * (1 - decay)
        total = size.sum()
        smoothed = (size + eps) / (total + k * eps) * total  # Laplace smoothing
        embed = embed_sum / smoothed[:, None]
        if self.cfg.l2_normalize:
            embed = hub.l2norm(embed)
        self.ema_cluster_size.copy_(size)
        self.ema_embed_sum.copy_(embed_sum)
        self.embed.copy_(embed)

    @property
    def restarts(self) -> bool:
        """Whether dead codes are re-seeded (`restart_after_steps` or `dead_code_threshold`)."""
        return self.cfg.restart_after_steps > 0 or self.cfg.dead_code_threshold > 0

    def _dead(self, counts: Tensor) -> Tensor:
        """Bool [K]: unused for `restart_after_steps` steps, or EMA cluster size (after this
        step's update) below `dead_code_threshold`."""
        cfg = self.cfg
        dead = torch.zeros_like(counts, dtype=torch.bool)
        if cfg.restart_after_steps > 0:
            self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
            dead |= self.unused_steps >= cfg.restart_after_steps
        if cfg.dead_code_threshold > 0:
            dead |= self.ema_cluster_size < cfg.dead_code_threshold
        return dead

    def _restart_dead_(self, x: Tensor, codes: Tensor, counts: Tensor) -> None:
        """Re-seed the dead codes (`_dead`) from this batch's vectors.

        `dead_code_sampling` "error" (default) draws each replacement with probability
        proportional to a vector's squared quantization error: vectors the codebook already fits
        (the frequent background of an image) are rarely picked, the badly served rare ones
        (small objects) often. "uniform" draws every vector alike, without replacement when the
        step has enough (vector-quantize-pytorch's `sample_vectors`).
        """
        dead = self._dead(counts).to(torch.uint8)
        _broadcast_(dead)  # rank 0 decides
        dead = dead.bool()
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        fresh = torch.empty(num_dead, x.shape[1], device=x.device)
        x, codes = _gather_rows(x), _gather_rows(codes)  # every rank's rows, drawn from on rank 0
        if _is_rank0():
            n = x.shape[0]
            # "uniform": vector-quantize-pytorch's `sample_vectors`, draw for draw
            if self.cfg.dead_code_sampling == "uniform":
                if n >= num_dead:
                    pick = torch.randperm(n, device=x.device)[:num_dead]
                else:
                    pick = torch.randint(0, n, (num_dead,), device=x.device)
            else:
                error = (x.float() - self.vectors[codes]).pow(2).sum(dim=1)  # (N,)
                weights = error + 1e-12 * error.max().clamp(min=1e-12)  # all stay possible
                pick = torch.multinomial(weights, num_dead, replacement=n < num_dead)
            fresh = x[pick].float()
        _broadcast_(fresh)
        if self.cfg.l2_normalize:
            fresh = hub.l2norm(fresh)
        self.embed.data[dead] = fresh.to(self.embed.dtype)
        if self.cfg.ema:
            # seen once at the new value (at the threshold: not re-seeded again at the next step)
            size = max(1.0, self.cfg.dead_code_threshold)
            self.ema_cluster_size[dead] = size
            self.ema_embed_sum[dead] = fresh.to(self.ema_embed_sum.dtype) * size
        if self.cfg.restart_after_steps > 0:
            self.unused_steps[dead] = 0


# ---------------------------------------------------------------------------------------------
# the quantizer


class QuantizerOutput(NamedTuple):
    """What every quantizer family's forward returns (vq, simvq, fsq, lfq)."""

    quantized: Tensor  # [B, D, H, W], value z_q, gradient by the estimator, input dtype
    codes: Tensor  # long [B, H, W] ids in [0, K), or [B, H, W, L] when num_quantizers > 1
    loss: Tensor  # codebook_loss + beta * commitment_loss (+ weighted entropy_loss), f32
    commitment_loss: Tensor  # ||z - sg[z_q]||^2, mean per quantizer, summed (unweighted)
    codebook_loss: Tensor  # ||sg[z] - z_q||^2 likewise; 0 when the codebook is EMA-updated
    # lfq: E[H(q(z))] - H(E[q(z)]); vq: the diversity loss log K - H(E[q(z)]) summed over levels
    # (training only, 0 while its weight is 0); unweighted; 0 for the others
    entropy_loss: Tensor


class VectorQuantizer(nn.Module):
    """Snaps each channel vector of `z_e` [B, D, H, W] to its nearest code (options in the config)."""

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__()
        if cfg.l2_normalize and cfg.num_quantizers > 1:
            raise ValueError(
                "quantizer: l2_normalize with num_quantizers > 1 is not supported (residuals of "
                "unit vectors are not unit vectors); set quantizer.num_quantizers=1 or "
                "l2_normalize=false"
            )
        self.dim = dim
        self.cfg = cfg
        search_dim = cfg.codebook_dim if cfg.codebook_dim is not None else dim
        self.search_dim = search_dim
        if cfg.codebook_dim is not None:
            self.proj_in = nn.Linear(dim, search_dim)
            self.proj_out = nn.Linear(search_dim, dim)
        else:
            self.proj_in = self.proj_out = None
        self.codebooks = nn.ModuleList(Codebook(search_dim, cfg) for _ in range(cfg.num_quantizers))
        # the diversity loss's weight now (the training loop sets cfg.diversity_weight_at(step))
        self.diversity_weight = cfg.diversity_weight

    @property
    def codebook(self) -> Tensor:
        """Codes in search space: [K, search_dim], or [L, K, search_dim] when num_quantizers > 1."""
        codes = [cb.vectors for cb in self.codebooks]
        return codes[0] if len(codes) == 1 else torch.stack(codes)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize `z_e` [B, D, H, W]; in training also update the codebooks (EMA/init/restarts)."""
        if z_e.ndim != 4 or z_e.shape[1] != self.dim:
            raise ValueError(
                f"VectorQuantizer expects z_e of shape [B, {self.dim}, H, W]; got {tuple(z_e.shape)}"
            )
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = hub.search_space(z_e, self.proj_in, self.cfg.l2_normalize)  # (N, search_dim)
            residual = z
            z_q = torch.zeros_like(z)
            commitment = z.new_zeros(())
            codebook_loss = z.new_zeros(())
            diversity = z.new_zeros(())
            all_codes = []
            for cb in self.codebooks:
                if self.training and not bool(cb.initialized):
                    cb.kmeans_init_(residual.detach())
                if self.training and self.diversity_weight > 0:
                    diversity = diversity + self._diversity_loss(residual, cb)
                codes = cb.search(residual)  # (N,)
                q = F.embedding(codes, cb.vectors)  # (N, search_dim)
                commitment = commitment + F.mse_loss(residual, q.detach())
                if not self.cfg.ema:
                    codebook_loss = codebook_loss + F.mse_loss(q, residual.detach())
                if self.training:
                    cb.update_(residual.detach(), codes)
                z_q = z_q + q
                residual = residual - q.detach()
                all_codes.append(codes)
            z_q = apply_estimator(self.cfg.estimator, z, z_q)  # value z_q, a gradient to z
            out = hub.project(z_q, self.proj_out)
            quantized = rearrange(out, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z_e.dtype)
            codes = torch.stack(all_codes, dim=-1)  # (N, L)
            codes = rearrange(codes, "(b h w) l -> b h w l", b=b, h=h, w=w)
            if self.cfg.num_quantizers == 1:
                codes = codes[..., 0]
            loss = codebook_loss + self.cfg.beta * commitment
            if self.diversity_weight > 0:
                loss = loss + self.diversity_weight * diversity
        return QuantizerOutput(quantized, codes, loss, commitment, codebook_loss, diversity)

    def _diversity_loss(self, x: Tensor, cb: Codebook) -> Tensor:
        """log K - H(E_n[p_n]) in nats for rows `x` [N, dim] against `cb`'s codes (detached: the
        loss moves the encoder's outputs towards the codes the batch uses little, and the EMA /
        codebook loss moves the codes); 0 when every code gets the same mean probability.

        The batch term of MAGVIT-v2's entropy penalty (Yu et al., ICLR 2024, eq. 5) applied to a
        learnt codebook (the aim of vector-quantize-pytorch's `codebook_diversity_loss_weight`,
        whose formula differs: docs/design.md, "Quantizer math"); chunked
        and over every process's rows (`entropy.soft_assignment`).
        """
        codes = cb.vectors.detach().clone()  # the EMA step rewrites the codes before backward
        code_sq = (codes * codes).sum(dim=1)
        temperature, chunk = self.cfg.diversity_temperature, self.cfg.chunk_size
        _, mean_p = soft_assignment(x, codes, temperature, chunk, code_sq)
        return math.log(codes.shape[0]) - batch_entropy(mean_p)

    def bypass(self, z_e: Tensor) -> Tensor:
        """The warm-up's decoder input for `z_e` [B, D, H, W]: forward with the snapping left out
        (projection in, l2 normalisation, projection out), so that the factorised projections
        train during the warm-up and the decoder meets the kind of vector the codes will give it.
        Plain codes (no projection, no l2): `z_e` itself."""
        return unsnapped(z_e, self.proj_in, self.proj_out, self.cfg.l2_normalize)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes [B, H, W] (or [B, H, W, L]) -> quantized vectors [B, D, H, W] in the module dtype."""
        vectors = hub.lookup(codes, [cb.vectors for cb in self.codebooks], self.proj_out)
        return vectors.to(self.codebooks[0].embed.dtype)


__all__ = [
    "QUANTIZER_PRESETS",
    "Codebook",
    "QuantizerConfig",
    "QuantizerOutput",
    "VectorQuantizer",
    "kmeans",
    "nearest_code",
    "unsnapped",
    "nearest_code_full",
]
