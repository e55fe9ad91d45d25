"""The image tokenizer's quantizers for inference: codes <-> vectors, loadable without vqgpt.

Self-contained remote code (imports only torch), and the one implementation of the inference
math: vqgpt's training quantizers (`vqgpt.tokenizer.quantize`, `simvq`, `fsq`, `lfq`) call or
subclass what is here, so codes and decoded vectors are vqgpt's bit for bit. Every family has
the same face: `search(z_e [B, D, h, w]) -> codes [B, h, w]` (or [B, h, w, L] for L residual VQ
levels) with ids in [0, K), and `lookup(codes) -> vectors [B, D, h, w]`. `quantizer.type` in
config.json picks the family (`build_quantizer`):

- `vq` (van den Oord et al. 2017): a learnt codebook e [K, d]; `k = argmin_i ||z - e_i||^2`,
  optionally factorised (`codebook_dim`: proj_in / proj_out), l2-normalised, residual.
- `simvq` (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One
  Linear Layer", ICCV 2025): a frozen random codebook C [K, d] and a learnt linear map W; the
  codes are e = C W^T, searched like VQ's. Every code moves whenever W does.
- `fsq` (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024, App. A.1):
  no codebook; each of the d = len(levels) dims (`fsq_levels` in config.json) is bounded and rounded to one of L_j values;
  K = prod(levels), the id is the mixed-radix number of the per-dim digits.
- `lfq` (Yu et al., "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation"
  (MAGVIT-v2), ICLR 2024, eq. 3): no codebook; each dim is its sign, q_j in {-1, +1};
  K = 2^d, id = sum_j [z_j > 0] 2^j.

Ids and digits: dim j has weight prod(levels[:j]) (dim 0 is the least significant digit); LFQ
is the all-2 case with digit [z_j > 0]. Everything runs in float32 (under autocast too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTIZER_TYPES = ("vq", "simvq", "fsq", "lfq")
FSQ_EPS = 1e-3  # FSQ's bound: half-widths (L - 1)(1 + eps) / 2, so round() never reaches L

# ---------------------------------------------------------------------------------------------
# search, projection and lookup (vqgpt's training quantizers call these too)


def l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return F.normalize(x, dim=-1, eps=eps)


@torch.no_grad()
def nearest_code(x: Tensor, codebook: Tensor, chunk_size: int) -> Tensor:
    """Index of the nearest codebook row for each row of `x` [N, D], `chunk_size` rows at a time.

    `argmin_i ||x - e_i||^2 = argmin_i (||e_i||^2 - 2 x.e_i)`: the constant `||x||^2` is dropped.
    Peak extra memory is one `[chunk_size, K]` score block. Ties go to the lowest index.
    """
    e_sq = codebook.pow(2).sum(dim=1)  # (K,)
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        rows = x[start : start + chunk_size]
        scores = torch.addmm(e_sq, rows, codebook.t(), beta=1.0, alpha=-2.0)  # (chunk, K)
        codes[start : start + chunk_size] = scores.argmin(dim=1)
    return codes


def project(x: Tensor, proj: nn.Linear | None) -> Tensor:
    """`proj(x)` in float32 even when the module is not (None: `x` itself)."""
    if proj is None:
        return x
    bias = None if proj.bias is None else proj.bias.float()
    return F.linear(x, proj.weight.float(), bias)


def search_space(z_e: Tensor, proj_in: nn.Linear | None, l2_normalize: bool) -> Tensor:
    """z_e [B, D, h, w] -> the float32 rows the codes are searched for: [B*h*w, search_dim]."""
    b, d, h, w = z_e.shape
    x = z_e.float().permute(0, 2, 3, 1).reshape(b * h * w, d)  # (N, D), row-major positions
    z = project(x, proj_in)  # (N, search_dim)
    return l2norm(z) if l2_normalize else z


def check_codes(codes: Tensor, k: int, levels: int = 1) -> Tensor:
    """`codes` as [B, h, w, levels]; ValueError unless [B, h, w] (levels 1) or [B, h, w, levels]
    with every id in [0, k)."""
    if levels == 1 and codes.ndim == 3:
        codes = codes[..., None]
    if codes.ndim != 4 or codes.shape[-1] != levels:
        want = "[B, h, w]" if levels == 1 else f"[B, h, w, {levels}]"
        raise ValueError(f"codes must be {want}, got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes must lie in [0, {k}); got {codes.min()}..{codes.max()}")
    return codes


def lookup(codes: Tensor, codebooks: list[Tensor], proj_out: nn.Linear | None) -> Tensor:
    """Codes [B, h, w] (or [B, h, w, L] for L residual levels) -> the sum of their vectors in
    each level's codebook [K, search_dim], projected back: [B, D, h, w] float32."""
    codes = check_codes(codes, codebooks[0].shape[0], len(codebooks))
    vectors = sum(F.embedding(codes[..., i], e) for i, e in enumerate(codebooks))
    return project(vectors, proj_out).permute(0, 3, 1, 2)  # (B, D, h, w)


def projections(dim: int, quant: dict) -> tuple[int, nn.Linear | None, nn.Linear | None]:
    """(search_dim, proj_in, proj_out): `codebook_dim` factorises the codes (Linear both ways)."""
    if quant["codebook_dim"] is None:
        return dim, None, None
    search_dim = quant["codebook_dim"]
    return search_dim, nn.Linear(dim, search_dim), nn.Linear(search_dim, dim)


def check_z_e(z_e: Tensor, dim: int) -> None:
    """ValueError unless z_e is [B, dim, h, w]."""
    if z_e.ndim != 4 or z_e.shape[1] != dim:
        raise ValueError(f"z_e must be [B, {dim}, h, w], got {tuple(z_e.shape)}")


# ---------------------------------------------------------------------------------------------
# vq: a learnt codebook (optionally factorised, l2-normalised, residual)


class Codebook(nn.Module):
    """One level's K codes (`embed`, [K, dim]) in search space."""

    def __init__(self, dim: int, codebook_size: int, l2_normalize: bool):
        super().__init__()
        self.l2_normalize = l2_normalize
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))

    @property
    def vectors(self) -> Tensor:
        """The [K, dim] codes in float32, unit-norm when `l2_normalize`."""
        embed = self.embed.float()
        return l2norm(embed) if self.l2_normalize else embed


class VectorQuantizer(nn.Module):
    """Nearest-code search (optionally factorised, l2-normalised, residual) and code lookup."""

    def __init__(self, dim: int, quant: dict):
        super().__init__()
        self.dim = dim
        self.num_quantizers = quant["num_quantizers"]
        self.codebook_size = quant["codebook_size"]
        self.chunk_size = quant["chunk_size"]
        self.l2_normalize = quant["l2_normalize"]
        search_dim, self.proj_in, self.proj_out = projections(dim, quant)
        self.codebooks = nn.ModuleList(
            Codebook(search_dim, self.codebook_size, self.l2_normalize)
            for _ in range(self.num_quantizers)
        )

    @torch.no_grad()
    def search(self, z_e: Tensor) -> Tensor:
        """z_e [B, D, h, w] -> codes [B, h, w] (one quantizer) or [B, h, w, L] (L residual ones)."""
        check_z_e(z_e, self.dim)
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            residual, all_codes = search_space(z_e, self.proj_in, self.l2_normalize), []
            for cb in self.codebooks:
                vectors = cb.vectors
                codes = nearest_code(residual, vectors, self.chunk_size)  # (N,)
                residual = residual - F.embedding(codes, vectors)
                all_codes.append(codes)
            codes = torch.stack(all_codes, dim=-1).reshape(
                b, h, w, self.num_quantizers
            )  # (B, h, w, L)
        return codes[..., 0] if self.num_quantizers == 1 else codes

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] (or [B, h, w, L]) -> quantized vectors [B, D, h, w]."""
        vectors = lookup(codes, [cb.vectors for cb in self.codebooks], self.proj_out)
        return vectors.to(self.codebooks[0].embed.dtype)


# ---------------------------------------------------------------------------------------------
# simvq: a frozen random codebook through a learnt linear map


class SimVectorQuantizer(nn.Module):
    """SimVQ: codes e = C W^T, C [K, d] a frozen N(0, 1/d) draw, W [d, d] learnt (`transform`).

    The search and lookup are VQ's over e (`codebook`); `frozen_codebook` is a saved buffer (the
    random draw is part of the model), `transform` a bias-free `nn.Linear(d, d)`.
    """

    def __init__(self, dim: int, quant: dict):
        super().__init__()
        self.dim = dim
        self.codebook_size = quant["codebook_size"]
        self.chunk_size = quant["chunk_size"]
        search_dim, self.proj_in, self.proj_out = projections(dim, quant)
        frozen = torch.randn(self.codebook_size, search_dim) * search_dim**-0.5
        self.register_buffer("frozen_codebook", frozen)
        self.transform = nn.Linear(search_dim, search_dim, bias=False)

    @property
    def codebook(self) -> Tensor:
        """The [K, d] codes C W^T in float32 (differentiable in W).

        Summed in float64, then rounded: a float32 matmul's last bit depends on the BLAS path
        (memory alignment: a loaded checkpoint vs the trained tensors), float64's does not reach
        float32, so export and vqgpt get the same codes.
        """
        codes = F.linear(self.frozen_codebook.double(), self.transform.weight.double())
        return codes.float()

    @torch.no_grad()
    def search(self, z_e: Tensor) -> Tensor:
        """z_e [B, D, h, w] -> codes [B, h, w]: the nearest row of `codebook`."""
        check_z_e(z_e, self.dim)
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = search_space(z_e, self.proj_in, False)  # (N, d)
            codes = nearest_code(z, self.codebook, self.chunk_size)  # (N,)
        return codes.reshape(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] -> quantized vectors [B, D, h, w]."""
        return lookup(codes, [self.codebook], self.proj_out).to(self.transform.weight.dtype)


# ---------------------------------------------------------------------------------------------
# fsq and lfq: implicit codebooks, ids are mixed-radix numbers of per-dim digits


def digits_to_ids(digits: Tensor, levels: list[int]) -> Tensor:
    """Digits [..., d] (digit j in [0, levels[j])) -> ids [...] = sum_j digit_j prod(levels[:j])."""
    basis = torch.tensor([math.prod(levels[:j]) for j in range(len(levels))], device=digits.device)
    return (digits.long() * basis).sum(dim=-1)


def ids_to_digits(ids: Tensor, levels: list[int]) -> Tensor:
    """Inverse of `digits_to_ids`: ids [...] in [0, prod(levels)) -> digits [..., d] (long)."""
    basis = torch.tensor([math.prod(levels[:j]) for j in range(len(levels))], device=ids.device)
    size = torch.tensor(levels, device=ids.device)
    return (ids.long()[..., None] // basis) % size


def fsq_bound(z: Tensor, levels: list[int]) -> Tensor:
    """FSQ's bound of z [N, d]: `tanh(z + s) * h - o` with h = (L - 1)(1 + eps)/2, o = 1/2 for even
    L (else 0), s = atanh(o / h): `round` of it takes exactly L integer values, -(L // 2) upward."""
    size = torch.tensor(levels, dtype=z.dtype, device=z.device)
    half = (size - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(size % 2 == 0, 0.5, 0.0).to(z.dtype)
    shift = torch.atanh(offset / half)
    return torch.tanh(z + shift) * half - offset


def fsq_values(digits: Tensor, levels: list[int]) -> Tensor:
    """FSQ digits [..., d] -> code values (digit - L // 2) / (L // 2) in [-1, 1], float32."""
    half = torch.tensor([n // 2 for n in levels], dtype=torch.float32, device=digits.device)
    return (digits.float() - half) / half


def lfq_values(digits: Tensor) -> Tensor:
    """LFQ digits [..., d] in {0, 1} -> code values {-1, +1}, float32."""
    return digits.float() * 2 - 1


class ScalarQuantizer(nn.Module):
    """FSQ (`kind` "fsq", d = len(levels)) or LFQ ("lfq", d = log2 K, levels all 2): no learnt
    codebook; d = the search dim (`codebook_dim` if set, else the latent dim)."""

    def __init__(self, dim: int, quant: dict, kind: str):
        super().__init__()
        self.dim, self.kind = dim, kind
        self.codebook_size = quant["codebook_size"]
        search_dim, self.proj_in, self.proj_out = projections(dim, quant)
        if kind == "fsq":
            self.levels = [int(n) for n in quant["fsq_levels"]]
        else:
            self.levels = [2] * search_dim
        if len(self.levels) != search_dim or math.prod(self.levels) != self.codebook_size:
            raise ValueError(
                f"quantizer {kind}: {search_dim} code dims and codebook_size "
                f"{self.codebook_size} do not fit levels {self.levels} (K = prod(levels))"
            )

    def digits(self, z: Tensor) -> Tensor:
        """Per-dim digits [N, d] (long) of the search-space rows z [N, d]."""
        if self.kind == "lfq":
            return (z > 0).long()
        half = torch.tensor([n // 2 for n in self.levels], device=z.device)
        return torch.round(fsq_bound(z, self.levels)).long() + half

    def values(self, digits: Tensor) -> Tensor:
        """Code values [..., d] (float32) of digits [..., d]."""
        return lfq_values(digits) if self.kind == "lfq" else fsq_values(digits, self.levels)

    def vectors_of(self, ids: Tensor) -> Tensor:
        """Code values [..., d] (float32, search space) of ids [...] in [0, K): the implicit
        codebook's rows (`vectors_of(torch.arange(K))` is all of it)."""
        return self.values(ids_to_digits(ids, self.levels))

    @torch.no_grad()
    def search(self, z_e: Tensor) -> Tensor:
        """z_e [B, D, h, w] -> codes [B, h, w]."""
        check_z_e(z_e, self.dim)
        b, _, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = search_space(z_e, self.proj_in, False)  # (N, d)
            ids = digits_to_ids(self.digits(z), self.levels)  # (N,)
        return ids.reshape(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] -> quantized vectors [B, D, h, w] (float32, or the projection's dtype)."""
        codes = check_codes(codes, self.codebook_size)[..., 0]  # (B, h, w)
        vectors = project(self.vectors_of(codes), self.proj_out)  # (B, h, w, D)
        dtype = self.proj_out.weight.dtype if self.proj_out is not None else torch.float32
        return vectors.permute(0, 3, 1, 2).to(dtype)  # (B, D, h, w)


def build_quantizer(dim: int, quant: dict) -> nn.Module:
    """The inference quantizer `quant["type"]` names (default "vq") over `dim` latent channels.

    Raises:
        ValueError: an unknown type, or dims that do not fit (see ScalarQuantizer).
    """
    kind = quant.get("type", "vq")
    if kind == "vq":
        return VectorQuantizer(dim, quant)
    if kind == "simvq":
        return SimVectorQuantizer(dim, quant)
    if kind in ("fsq", "lfq"):
        return ScalarQuantizer(dim, quant, kind)
    raise ValueError(f"quantizer.type {kind!r} is unknown; known: {list(QUANTIZER_TYPES)}")
