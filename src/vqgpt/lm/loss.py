"""The stage-two loss: next-token cross-entropy from hidden states, chunked, never [B, T, V] logits."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from vqgpt.lm.positions import ImagePositions, forward_position_ids
from vqgpt.lm.sequences import IGNORE_INDEX

LOSS_MODES = ("split", "full")  # see lm_loss; `model.loss` in an LM recipe


class LossOutput(NamedTuple):
    """What `lm_loss` returns; every field but `loss` is detached. Sums and counts (not only
    means) so that means over several batches or processes are exact."""

    loss: Tensor  # scalar: weighted_sum / normalizer (default weight_sum), what is trained
    per_position: Tensor  # [B, T-1] float32 unweighted CE, 0 where the target is ignored
    weighted_sum: Tensor  # scalar: sum(w * ce) over targeted positions
    weight_sum: Tensor  # scalar: sum(w) over targeted positions
    image_sum: Tensor  # scalar: unweighted CE summed over image-code targets
    image_count: Tensor  # scalar: image-code targets
    text_sum: Tensor  # scalar: unweighted CE summed over text / special targets
    text_count: Tensor  # scalar: text / special targets

    @property
    def image_loss(self) -> Tensor:
        """Mean unweighted CE over image-code targets (0 if none)."""
        return self.image_sum / self.image_count.clamp_min(1)

    @property
    def text_loss(self) -> Tensor:
        """Mean unweighted CE over text / special targets (0 if none)."""
        return self.text_sum / self.text_count.clamp_min(1)


class RowGroup(NamedTuple):
    """Positions (rows of the flat hidden states) whose softmax runs over weight rows [lo, hi)."""

    positions: Tensor  # [n] long
    lo: int
    hi: int


def _gaps(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The parts of [0, n) that no (lo, hi) of `ranges` (disjoint) covers, in order."""
    gaps, at = [], 0
    for lo, hi in sorted(ranges):
        if lo > at:
            gaps.append((at, lo))
        at = max(at, hi)
    return gaps + ([(at, n)] if at < n else [])


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W[lo:hi].T, y_i - lo) per row group, chunked over positions.

    Why a custom Function rather than `torch.utils.checkpoint` per chunk: the gradient of CE wrt
    the logits is known in closed form (w * (softmax - onehot)), so the forward turns each
    chunk's logits straight into its contributions to dL/dh and dL/dW and frees them. Peak memory
    is one chunk's float32 logits plus the two gradient buffers (the size of h and W), and the
    head costs 3 matmuls instead of checkpoint's 4 (which recomputes every chunk's logits in the
    backward). The price: gradients are computed even if no backward follows (skipped when grad
    mode is off) and the loss is differentiable once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # [M, C]
        weight: Tensor,  # [Vpad, C]
        targets: Tensor,  # [M] absolute ids
        weights: Tensor,  # [M] float32
        groups: tuple[RowGroup, ...],
        chunk_size: int,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        need_h = need_grad and ctx.needs_input_grad[0]
        need_w = need_grad and ctx.needs_input_grad[1]
        ce = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        # every row of grad_w is written once (a group's first chunk, or the zero fill of rows no
        # group reaches) before chunks add to it: no zero pass over the ~V x C buffer
        grad_w = torch.empty_like(weight, dtype=torch.float32) if need_w else None
        written: list[tuple[int, int]] = []  # row ranges of grad_w holding a group's gradient
        device_type = hidden.device.type
        for positions, lo, hi in groups:
            if positions.numel() == 0:
                continue  # no target: its rows of grad_w are zero-filled below
            w_rows = weight[lo:hi]  # (V_g, C)
            if torch.is_autocast_enabled(device_type):  # cast the slice once, not once per chunk
                w_rows = w_rows.to(torch.get_autocast_dtype(device_type))
            for start in range(0, positions.numel(), chunk_size):
                pos = positions[start : start + chunk_size]  # (n,)
                h = hidden[pos]  # (n, C)
                y = (targets[pos] - lo).unsqueeze(1)  # (n, 1)
                logits = (h @ w_rows.T).float()  # (n, V_g): the only chunk-sized buffer
                lse = logits.logsumexp(dim=1, keepdim=True)  # (n, 1)
                ce[pos] = (lse - logits.gather(1, y)).squeeze(1)
                if not (need_h or need_w):
                    continue
                probs = logits.sub_(lse).exp_()  # softmax, in the logits' memory
                probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
                dlogits = probs.mul_(weights[pos].unsqueeze(1))  # (n, V_g) = w * (p - onehot)
                dlogits = dlogits.to(w_rows.dtype)  # one cast for both products
                if need_h:
                    grad_h[pos] = (dlogits @ w_rows).to(grad_h.dtype)
                if need_w:
                    part = dlogits.T @ h  # (V_g, C)
                    if start == 0:
                        grad_w[lo:hi].copy_(part)
                        written.append((lo, hi))
                    else:
                        grad_w[lo:hi] += part
        if grad_w is not None:
            for lo, hi in _gaps(written, grad_w.shape[0]):
                grad_w[lo:hi].zero_()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * weights).sum(), ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        # in place: the buffers are this call's own (once_differentiable), and a second ~V x C
        # allocation per micro-batch is what the CPU steps spent their time on
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    loss_weights: Tensor | None,
    mode: str,
    image_offset: int,
    codebook_size: int,
    chunk_size: int = 4096,
    normalizer: Tensor | float | None = None,
) -> LossOutput:
    """Next-token CE from final hidden states [B, T, C] without materialising [B, T, V] logits.

    `labels` [B, T] are unshifted (hidden[:, t] predicts labels[:, t+1]), -100 = ignore;
    `loss_weights` [B, T] align with labels (None = all ones). mode "full": softmax over the real
    rows [0, image_offset + codebook_size). mode "split": over the image rows
    [image_offset, image_offset + codebook_size) where the target is an image code, over the text
    and special rows [0, image_offset) elsewhere: the distributions constrained decoding samples.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"lm_loss mode must be one of {list(LOSS_MODES)}, got {mode!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seq_len, _ = hidden.shape
    if labels.shape != (batch, seq_len):
        raise ValueError(
            f"labels {tuple(labels.shape)} must match hidden's [B, T] = {batch, seq_len}"
        )
    if loss_weights is not None and loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must match labels")
    real = image_offset + codebook_size
    if lm_head_weight.shape[0] < real:
        raise ValueError(
            f"lm_head has {lm_head_weight.shape[0]} rows but the vocabulary needs {real} "
            f"(image_offset {image_offset} + codebook_size {codebook_size}): resize the model"
        )

    flat = rearrange(hidden[:, :-1], "b t c -> (b t) c")  # position t predicts token t + 1
    targets = rearrange(labels[:, 1:], "b t -> (b t)")
    if loss_weights is None:
        loss_weights = torch.ones_like(labels, dtype=torch.float32)
    weights = rearrange(loss_weights[:, 1:], "b t -> (b t)").float()
    valid = targets != IGNORE_INDEX
    if (valid & ((targets < 0) | (targets >= real))).any():
        raise ValueError(f"labels hold ids outside [0, {real}) other than {IGNORE_INDEX}")
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    is_image = valid & (targets >= image_offset)
    is_text = valid & ~is_image

    if mode == "full":
        groups = (RowGroup(valid.nonzero().squeeze(1), 0, real),)
    else:
        groups = (
            RowGroup(is_text.nonzero().squeeze(1), 0, image_offset),
            RowGroup(is_image.nonzero().squeeze(1), image_offset, real),
        )
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    weighted_sum, ce = _ChunkedLinearCE.apply(
        flat, lm_head_weight, targets, weights, groups, chunk_size, need_grad
    )
    weight_sum = weights.sum()
    if normalizer is None:
        normalizer = weight_sum.clamp_min(torch.finfo(torch.float32).tiny)
    return LossOutput(
        loss=weighted_sum / normalizer,
        per_position=rearrange(ce, "(b t) -> b t", b=batch),
        weighted_sum=weighted_sum.detach(),
        weight_sum=weight_sum.detach(),
        image_sum=(ce * is_image).sum(),
        image_count=is_image.sum(),
        text_sum=(ce * is_text).sum(),
        text_count=is_text.sum(),
    )


class LMWithLoss(nn.Module):
    """A causal LM (GPT-2) with `lm_loss` inside its `forward`.

    Data-parallel and sharding wrappers (DDP, FSDP1, FSDP2) run their hooks around `forward`:
    computed here, the loss reads the output layer while it is whole (under FSDP it is a shard
    outside the forward). `lm` is the Hugging Face model itself, saved with `save_pretrained`.
    """

    def __init__(self, lm: nn.Module, mode: str, image_offset: int, codebook_size: int) -> None:
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"lm_loss mode must be one of {list(LOSS_MODES)}, got {mode!r}")
        self.lm = lm
        self.mode = mode
        self.image_offset = image_offset
        self.codebook_size = codebook_size

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        loss_weights: Tensor | None = None,
        normalizer: Tensor | float | None = None,
    ) -> LossOutput:
        """`lm_loss` of the batch ([B, T] each) from the LM's final hidden states."""
        scheme = ImagePositions.of(self.lm.config)
        positions = forward_position_ids(input_ids, attention_mask, scheme)
        hidden = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        )
        return lm_loss(
            hidden.last_hidden_state,
            self.lm.get_output_embeddings().weight,
            labels,
            loss_weights,
            self.mode,
            self.image_offset,
            self.codebook_size,
            normalizer=normalizer,
        )


__all__ = ["LOSS_MODES", "LMWithLoss", "LossOutput", "RowGroup", "lm_loss"]
