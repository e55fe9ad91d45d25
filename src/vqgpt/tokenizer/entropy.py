"""Soft code assignments and their entropies: LFQ's entropy penalty and VQ's diversity loss.

p_n(c) = softmax_c(-||z_n - c||^2 / T) over the K codes for each search-space row z_n. LFQ's
penalty (`lfq.py`; Yu et al., MAGVIT-v2, ICLR 2024, eq. 5) is E_n[H(p_n)] - H(E_n[p_n]); VQ's
diversity loss (`quantizer.diversity_weight`, quantize.py) is log K - H(E_n[p_n]), the batch
term alone. H of the batch mean m is `-sum m log(m + 1e-5)`: the MAGVIT authors' epsilon
(google-research/magvit `videogvt/train_lib/losses.py`), which bounds the pull towards codes the
batch leaves unused (docs/results.md, issue 15 fifth round). The [N, K] table is never held
whole (the mission's "no N x K matrix"): `chunk_size` rows at a time, each chunk recomputed in
the backward pass (activation checkpointing). The mean spans every process's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# MAGVIT's epsilon in the batch entropy's log (module docstring)
BATCH_ENTROPY_EPS = 1e-5


def _chunk_entropy(
    z: Tensor, codebook: Tensor, temperature: float, code_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum over rows of H(p_n), sum over rows of p_n [K]) for rows z [n, d], codes [K, d]."""
    # -||z - c||^2 / T = (2 z.c - ||z||^2 - ||c||^2) / T; ||z||^2 is a per-row constant (dropped);
    # so is ||c||^2 = d for LFQ's codes (code_sq None), not for a learnt codebook's
    logits = 2 * z @ codebook.t()
    if code_sq is not None:
        logits = logits - code_sq
    logp = F.log_softmax(logits / temperature, dim=-1)  # (n, K)
    p = logp.exp()
    return -(p * logp).sum(), p.sum(dim=0)


def soft_assignment(
    z: Tensor, codebook: Tensor, temperature: float, chunk_size: int, code_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(E_n[H(p_n)], E_n[p_n] [K]) for rows z [N, d] over codes [K, d], p_n = softmax_c(-||z_n -
    c||^2 / T), float32; `code_sq` [K] the codes' squared norms (None: all equal, LFQ's).

    The batch mean E_n is over every process's rows when torch.distributed is initialised (all
    ranks must call this with the same N; a [K] all-reduce with autograd). Peak memory
    O(chunk_size * K): the [N, K] table is built a chunk at a time and recomputed in backward.
    """
    row_entropy, prob_sum = z.new_zeros(()), z.new_zeros(codebook.shape[0])
    for start in range(0, z.shape[0], chunk_size):
        rows = z[start : start + chunk_size]
        if torch.is_grad_enabled() and rows.requires_grad:
            h, p = checkpoint(
                _chunk_entropy, rows, codebook, temperature, code_sq, use_reentrant=False
            )
        else:
            h, p = _chunk_entropy(rows, codebook, temperature, code_sq)
        row_entropy, prob_sum = row_entropy + h, prob_sum + p
    n = z.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        prob_sum = all_reduce(prob_sum)  # its backward all-reduces the gradient
        n = n * dist.get_world_size()
    return row_entropy / z.shape[0], prob_sum / n


def batch_entropy(mean_p: Tensor) -> Tensor:
    """H(m) of a code distribution m [K] in nats, as `-sum m log(m + 1e-5)` (MAGVIT's epsilon)."""
    return -(mean_p * (mean_p + BATCH_ENTROPY_EPS).log()).sum()


def entropy_penalty(z: Tensor, codebook: Tensor, temperature: float, chunk_size: int) -> Tensor:
    """E_n[H(p_n)] - H(E_n[p_n]) for rows z [N, d] over codes [K, d], in nats (float32 scalar);
    H(E_n[p_n]) with MAGVIT's log(m + 1e-5) (module docstring).

    The batch mean E_n is over every process's rows when torch.distributed is initialised (all
    ranks must call this with the same N). Peak memory O(chunk_size * K) (module docstring).
    """
    row_entropy, mean_p = soft_assignment(z, codebook, temperature, chunk_size)
    return row_entropy - batch_entropy(mean_p)
