"""vqgpt.lm.loss: the chunked split / full cross-entropy against full-logit references and HF."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqgpt.lm.loss import lm_loss
from vqgpt.lm.model import LMConfig, build_lm, forward_hidden

OFF, K, VPAD, C = 40, 20, 64, 16  # small joint vocabulary: text [0, 40), images [40, 60), pad
IMAGE_OFFSET = 50257 + 2  # GPT-2's ids, then <|boi|>, <|eoi|>


def loss_inputs(seed: int = 0, batch: int = 3, seq: int = 11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, C, generator=gen, requires_grad=True)
    weight = (torch.randn(VPAD, C, generator=gen) * 0.5).requires_grad_()
    text = torch.randint(0, OFF, (batch, seq), generator=gen)
    image = torch.randint(OFF, OFF + K, (batch, seq), generator=gen)
    kind = torch.rand(batch, seq, generator=gen)
    labels = torch.where(kind < 0.5, image, text)
    labels[kind > 0.85] = -100
    loss_weights = torch.rand(batch, seq, generator=gen) + 0.1
    return hidden, weight, labels, loss_weights


def reference_loss(hidden, weight, labels, loss_weights, mode):
    """Full logits, log_softmax over the row slice each target's mode allows."""
    logits = hidden[:, :-1] @ weight.T  # (B, T-1, Vpad)
    y, w = labels[:, 1:], loss_weights[:, 1:]
    valid, is_image = y != -100, y >= OFF
    if mode == "full":
        flat = F.cross_entropy(logits[..., : OFF + K].flatten(0, 1), y.flatten(), reduction="none")
        ce = flat.view_as(y)
    else:
        lp_text = logits[..., :OFF].log_softmax(-1)
        lp_image = logits[..., OFF : OFF + K].log_softmax(-1)
        ce_text = -lp_text.gather(-1, y.clamp(0, OFF - 1).unsqueeze(-1)).squeeze(-1)
        ce_image = -lp_image.gather(-1, (y - OFF).clamp(0, K - 1).unsqueeze(-1)).squeeze(-1)
        ce = torch.where(is_image, ce_image, ce_text) * valid
    return (ce * w * valid).sum() / (w * valid).sum(), ce


@pytest.mark.parametrize("mode", ["split", "full"])
def test_lm_loss_matches_reference_values_and_gradients(mode):
    hidden, weight, labels, loss_weights = loss_inputs()
    ref, ref_ce = reference_loss(hidden, weight, labels, loss_weights, mode)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))

    out = lm_loss(hidden, weight, labels, loss_weights, mode, OFF, K, chunk_size=7)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.per_position, ref_ce.detach())
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1])
    assert grads[1][OFF + K :].abs().max() == 0  # padding rows never learn

    valid, is_image = labels[:, 1:] != -100, labels[:, 1:] >= OFF
    torch.testing.assert_close(out.image_loss, ref_ce[is_image].mean().detach())
    torch.testing.assert_close(out.text_loss, ref_ce[valid & ~is_image].mean().detach())
    torch.testing.assert_close(out.weight_sum, (loss_weights[:, 1:] * valid).sum())


def test_a_group_without_targets_gets_zero_gradient_rows():
    # only image targets: the text rows' gradient is written by no chunk (the buffer starts empty)
    hidden, weight, labels, loss_weights = loss_inputs(seed=3)
    labels = torch.where(labels >= 0, labels % K + OFF, labels)
    ref, _ = reference_loss(hidden, weight, labels, loss_weights, "split")
    out = lm_loss(hidden, weight, labels, loss_weights, "split", OFF, K, chunk_size=4)
    grad_w = torch.autograd.grad(out.loss, weight)[0]
    torch.testing.assert_close(grad_w, torch.autograd.grad(ref, weight)[0])
    assert grad_w[:OFF].abs().max() == 0 and grad_w[OFF + K :].abs().max() == 0


def test_split_and_full_differ():
    hidden, weight, labels, loss_weights = loss_inputs()
    split = lm_loss(hidden, weight, labels, loss_weights, "split", OFF, K).loss
    full = lm_loss(hidden, weight, labels, loss_weights, "full", OFF, K).loss
    assert split < full  # a softmax over fewer rows gives every target more mass


@pytest.mark.parametrize("mode", ["split", "full"])
def test_lm_loss_does_not_depend_on_chunk_size(mode):
    hidden, weight, labels, loss_weights = loss_inputs(seed=1)
    results = []
    for chunk_size in (1, 5, 4096):
        out = lm_loss(hidden, weight, labels, loss_weights, mode, OFF, K, chunk_size=chunk_size)
        results.append((out.loss, *torch.autograd.grad(out.loss, (hidden, weight))))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b)


def test_lm_loss_defaults_no_grad_and_errors():
    hidden, weight, labels, _ = loss_inputs(seed=2)
    ones = torch.ones_like(labels, dtype=torch.float32)
    with_ones = lm_loss(hidden, weight, labels, ones, "split", OFF, K).loss
    with torch.no_grad():
        out = lm_loss(hidden, weight, labels, None, "split", OFF, K)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, with_ones.detach())

    nothing = torch.full_like(labels, -100)
    empty = lm_loss(hidden, weight, nothing, None, "split", OFF, K)
    assert empty.loss.item() == 0.0 and empty.per_position.abs().sum() == 0
    empty.loss.backward()  # still connected to the graph (DDP needs every step to backward)

    bad = labels.clone()
    bad[0, 3] = OFF + K  # a padding row as a target
    with pytest.raises(ValueError, match="outside"):
        lm_loss(hidden, weight, bad, None, "full", OFF, K)
    with pytest.raises(ValueError, match="resize the model"):
        lm_loss(hidden, weight[:50], labels, None, "full", OFF, K)


def test_lm_loss_keeps_no_chunk_logits_for_backward():
    batch, seq, vpad = 4, 65, 512
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, 8, generator=gen, requires_grad=True)
    weight = torch.randn(vpad, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 500, (batch, seq), generator=gen)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lm_loss(hidden, weight, labels, None, "split", 300, 200, chunk_size=64)
    full_logits_bytes = batch * (seq - 1) * vpad * 4
    assert sum(saved) < full_logits_bytes / 4
    out.loss.backward()
    assert hidden.grad.abs().sum() > 0 and weight.grad[:500].abs().sum() > 0


def test_full_loss_agrees_with_hugging_face_on_a_model():
    codebook = 45  # 50259 + 45 = 50304: no padding, so HF's loss sees the same rows
    model = build_lm(LMConfig(), IMAGE_OFFSET + codebook, n_positions=16)
    ids = torch.randint(0, IMAGE_OFFSET + codebook, (2, 16), generator=torch.Generator())
    labels = ids.clone()
    labels[:, :4] = -100
    hidden = forward_hidden(model, ids)
    torch.testing.assert_close(hidden, model.transformer(ids).last_hidden_state)
    ours = lm_loss(hidden, model.lm_head.weight, labels, None, "full", IMAGE_OFFSET, codebook)
    torch.testing.assert_close(ours.loss, model(ids, labels=labels).loss)


def test_lm_loss_under_bf16_autocast():
    hidden, weight, labels, loss_weights = loss_inputs(seed=3)
    ref, _ = reference_loss(hidden, weight, labels, loss_weights, "split")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss(hidden, weight, labels, loss_weights, "split", OFF, K)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, atol=0.05, rtol=0.02)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
