"""Shared image positions (`sequences.image_positions: shared`): every image's codes at the
positions of a t2i example's codes, in training, evaluation and every decoding loop."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from vqgpt.config import ConfigError
from vqgpt.lm.continuation import continue_document_ids
from vqgpt.lm.decoding import KVDecoder
from vqgpt.lm.loss import LMWithLoss
from vqgpt.lm.model import forward_hidden
from vqgpt.lm.positions import ImagePositions, PositionTracker, position_ids
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.lm.sequences import SequenceConfig
from vqgpt.lm.vocab import VocabLayout

# eos 99, boi 100, eoi 101, images 102..117 (as in test_decoding.py)
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
HW = 9
SCHEME = ImagePositions(offset=5, boi_id=100, code_lo=102, code_hi=118)
EOS, BOI, EOI = 99, 100, 101


def image(first: int) -> list[int]:
    """boi, 9 codes, eoi."""
    return [BOI, *(102 + (first + k) % 16 for k in range(HW)), EOI]


# a document: text, an image, text, a second image right after, text
DOC = [EOS, 7, 8, *image(0), 9, 10, 11, *image(3), *image(6), 12]


def test_sequential_positions_count_real_tokens_only():
    ids = torch.tensor([[EOS, EOS, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids(ids, mask, None).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_shared_positions_put_every_images_codes_at_the_same_positions():
    ids = torch.tensor([[EOS, EOS, *DOC], [*DOC, EOS, EOS]])  # left and right padded
    mask = torch.tensor([[0, 0] + [1] * len(DOC), [1] * len(DOC) + [0, 0]])
    pos = position_ids(ids, mask, SCHEME)
    left, right = pos[0, 2:].tolist(), pos[1, : len(DOC)].tolist()
    assert left == right
    for start in (3, 17, 28):  # the three boi's indices in DOC
        assert DOC[start] == BOI and left[start] == start  # boi and eoi stay sequential
        assert left[start + 1 : start + 1 + HW] == list(range(5, 5 + HW))
        assert left[start + 1 + HW] == start + 1 + HW
    text = [i for i, t in enumerate(DOC) if t < 100]
    assert [left[i] for i in text] == text
    # codes before any boi (a malformed row) stay sequential too
    stray = torch.tensor([[EOS, 105, 106]])
    assert position_ids(stray, None, SCHEME).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("cut", [1, 5, 14, 20])
def test_the_decoding_tracker_gives_the_whole_sequences_positions(cut):
    rows = [[EOS, 3, *DOC[1:]], DOC[:-2]]
    width = max(map(len, rows))
    for scheme in (None, SCHEME):
        prompts = [r[:cut] for r in rows]
        ids = torch.tensor([[EOS] * (cut - len(p)) + p for p in prompts])  # all `cut` long here
        mask = torch.ones_like(ids)
        tracker = PositionTracker(scheme)
        got = [tracker.start(ids, mask)]
        for t in range(cut, width):
            fed = torch.tensor([r[t] if t < len(r) else EOS for r in rows])
            got.append(tracker.next(fed))
        full = torch.tensor([r + [EOS] * (width - len(r)) for r in rows])
        assert torch.equal(torch.cat(got, dim=1), position_ids(full, None, scheme))


@pytest.fixture(scope="module")
def models(tiny_gpt2):
    """The same weights, sequential and with shared image positions."""
    plain = tiny_gpt2(LAYOUT, n_positions=64)
    shared = copy.deepcopy(plain)
    shared.config.image_positions = SCHEME.to_dict()
    return plain, shared


def test_the_decoder_and_the_forwards_read_the_models_positions(models):
    plain, shared = models
    ids = torch.tensor([DOC])
    with torch.no_grad():
        ones = torch.ones_like(ids)  # with no mask, transformers reads a position jump as packing
        want = shared(
            ids, attention_mask=ones, position_ids=position_ids(ids, None, SCHEME)
        ).logits[0]
        sequential = plain(ids).logits[0]
        assert not torch.allclose(want, sequential, atol=1e-3)  # the positions matter
        for model, expect in ((shared, want), (plain, sequential)):
            decoder = KVDecoder(model, "dynamic")
            logits = [decoder.start([DOC[:4]], EOS, len(DOC))]
            for t in DOC[4:-1]:
                logits.append(decoder.step(torch.tensor([t])))
            assert torch.allclose(torch.cat(logits), expect[3:-1], atol=1e-4)
            hidden = forward_hidden(model, ids)[0, -1]  # no mask given
            assert torch.allclose(model.lm_head(hidden), expect[-1], atol=1e-4)


def test_the_training_loss_reads_the_models_positions(models):
    plain, shared = models
    ids = torch.tensor([DOC, DOC[::-1]])
    mask = torch.ones_like(ids)
    labels = ids.clone()
    losses = [
        LMWithLoss(m, "full", LAYOUT.image_offset, LAYOUT.codebook_size)(ids, mask, labels).loss
        for m in models
    ]
    with torch.no_grad():
        logits = shared(
            ids, attention_mask=mask, position_ids=position_ids(ids, mask, SCHEME)
        ).logits[:, :-1]
    logits = logits[..., : LAYOUT.vocab_size]  # "full": a softmax over the real vocabulary
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(losses[1], want, atol=1e-5)
    assert not torch.allclose(losses[0], losses[1], atol=1e-4)
    del plain


def test_documents_continue_as_their_uncached_reference_with_shared_positions(
    models, boost_logits, reference_document
):
    _, shared = models
    prompts = [[EOS, 5, 17], DOC[:14]]  # the second has an image already
    handle = boost_logits(shared, torch.arange(128) == BOI, 3.0)  # images are opened
    try:
        greedy = SamplingConfig(do_sample=False, cfg_scale=1.0)
        runs = continue_document_ids(shared, LAYOUT, prompts, greedy, 30, max_images=3)
        expected = [reference_document(shared, LAYOUT, p, 30) for p in prompts]
    finally:
        handle.remove()
    assert [r.tokens for r in runs] == expected
    assert sum(r.images for r in runs) > 0


def test_the_config_records_the_scheme_and_rejects_unknown_ones():
    assert SequenceConfig().positions(LAYOUT) is None
    shared = SequenceConfig(image_positions="shared", t2i_prefix_length=20, max_length=64)
    assert shared.positions(LAYOUT) == ImagePositions(21, BOI, 102, 118)
    assert replace(shared, t2i_prefix_length=None).positions(LAYOUT).offset == 2
    with pytest.raises(ConfigError, match="image_positions must be one of"):
        SequenceConfig(image_positions="2d")
