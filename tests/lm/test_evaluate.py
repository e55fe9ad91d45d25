"""vqgpt.lm.evaluate: which targets each held-out loss group averages over."""

from __future__ import annotations

import torch

from vqgpt.lm.evaluate import group_masks
from vqgpt.lm.sequences import SequenceConfig, build_caption, build_t2i, collate, pack
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
    assert set(masks) == {f"{t}{k}" for t in ("t2i", "caption") for k in ("", "/image", "/text")}
