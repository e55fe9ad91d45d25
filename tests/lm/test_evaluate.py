"""vqgpt.lm.evaluate: which targets each held-out loss group averages over."""

from __future__ import annotations

import math

import torch

from vqgpt.lm.evaluate import LMEvalConfig, eval_examples, evaluate_lm, group_masks
from vqgpt.lm.sequences import (
    SequenceConfig,
    build_caption,
    build_document,
    build_t2i,
    collate,
    pack,
    token_budget,
)
from vqgpt.lm.vocab import VocabLayout

LAYOUT = VocabLayout(codebook_size=8, grid=(2, 3), text_vocab_size=20)
EOS = LAYOUT.eos_id
CODES = torch.tensor([[1, 2, 3], [4, 5, 6]])
CAP = [10, 11, 12]


def test_group_masks_select_each_task_and_kind():
    cfg = SequenceConfig()
    examples = [build_t2i(CODES, CAP, LAYOUT, cfg), build_caption(CODES, CAP, LAYOUT, cfg)]
    batch = collate(pack(examples, 26, EOS), pad_id=EOS)  # one window: t2i (13) + caption (13)
    masks = group_masks(batch["labels"], batch["task_ids"], LAYOUT)

    def targets(key: str) -> list[int]:
        """Token positions (in input_ids) a mask over shifted targets selects."""
        return (masks[key][0].nonzero().squeeze(1) + 1).tolist()

    # t2i: eos caption(3) boi codes(6) eoi eos -> targets boi (4), codes (5..10), eoi, eos
    assert targets("t2i/image") == [5, 6, 7, 8, 9, 10]
    assert targets("t2i/text") == [4, 11, 12]
    assert targets("t2i") == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    # caption at 13: eos boi codes(6) eoi caption(3) eos -> targets caption (22..24) and eos
    assert targets("caption/text") == [22, 23, 24, 25]
    assert targets("caption/image") == [] and targets("caption") == [22, 23, 24, 25]
    tasks = ("t2i", "caption", "document")
    assert set(masks) == {f"{t}{k}" for t in tasks for k in ("", "/image", "/text")}
    assert not masks["document"].any()


def test_group_masks_select_documents():
    doc = build_document([[10, 11], CODES, [12]], LAYOUT, None)  # eos 10 11 boi codes eoi 12 eos
    batch = collate([build_caption(CODES, CAP, LAYOUT, SequenceConfig()), doc], pad_id=EOS)
    masks = group_masks(batch["labels"], batch["task_ids"], LAYOUT)
    positions = (masks["document/image"][1].nonzero().squeeze(1) + 1).tolist()
    assert positions == [4, 5, 6, 7, 8, 9]
    assert (masks["document/text"][1].nonzero().squeeze(1) + 1).tolist() == [1, 2, 3, 10, 11, 12]
    assert not masks["document"][0].any() and not masks["caption"][1].any()


def test_evaluation_of_captions_at_and_past_the_maximum_length(tiny_gpt2, memory_bank):
    # held-out captions as long as the window allows, and longer: cut as training cuts them,
    # never run past the position table (IndexError)
    n_positions = 20
    model = tiny_gpt2(LAYOUT, n_positions=n_positions)
    budget = token_budget(n_positions, LAYOUT).caption
    seq = SequenceConfig(max_length=n_positions)
    codes = torch.stack([CODES, CODES.flip(0), CODES])
    bank = memory_bank(codes, [[3] * budget, [4] * (budget + 7), CAP], LAYOUT)
    examples = eval_examples(bank, seq, limit=3)
    assert max(len(ex) for ex in examples) == n_positions
    assert len(examples) == 6
    result = evaluate_lm(model, bank, bank, seq, LMEvalConfig(batch_size=4, baseline_images=3))
    assert math.isfinite(result.full["t2i"]) and math.isfinite(result.full["caption"])


def test_evaluation_reports_documents_only_when_given(tiny_gpt2, memory_bank, memory_documents):
    model = tiny_gpt2(LAYOUT)
    seq = SequenceConfig(max_length=40)
    bank = memory_bank(torch.stack([CODES, CODES.flip(1)]), [CAP, [3, 4]], LAYOUT)
    docs = memory_documents([[[10, 11], CODES, [12]], [CODES.flip(0)], [[5] * 60]], LAYOUT)
    cfg = LMEvalConfig(batch_size=2, baseline_images=2)
    without = evaluate_lm(model, bank, bank, seq, cfg)
    assert not any("document" in k for k in without.to_log())
    assert "document" not in without.summary()
    result = evaluate_lm(model, bank, bank, seq, cfg, docs, docs)
    for group in ("document", "document/image", "document/text"):
        assert math.isfinite(result.full[group]) and math.isfinite(result.unigram_full[group])
    assert result.split["document/image"] <= result.full["document/image"] + 1e-6
    assert "document " in result.summary()
    # adding documents leaves the image tasks' numbers as they were
    for key, value in without.to_log().items():
        assert result.to_log()[key] == value, key
