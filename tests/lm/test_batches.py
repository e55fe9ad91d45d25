"""Per-epoch batches of stage two: what each process trains on, and the loss's normalizer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vqgpt.lm.batches import ExampleBank, build_epoch
from vqgpt.lm.sequences import SequenceConfig
from vqgpt.lm.vocab import VocabLayout

LAYOUT = VocabLayout(codebook_size=8, grid=(2, 2), text_vocab_size=30)


def bank(n: int = 40) -> ExampleBank:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (n, 2, 2), generator=gen)
    text_ids = [
        [int(t) for t in torch.randint(0, 29, (1 + i % 5,), generator=gen)] for i in range(n)
    ]
    tokenizer = SimpleNamespace(layout=LAYOUT)  # build_epoch reads the layout only
    return ExampleBank(codes, text_ids, [""] * n, tokenizer, Path("."))


def target_weight(batch: dict) -> float:
    return float(batch["loss_weights"][:, 1:].sum())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ranks_split_each_global_batch_and_share_its_normalizer(accumulation):
    seq = SequenceConfig(max_length=24, pack=True, seed=3)
    data = bank()
    one = build_epoch(data, seq, epoch=1, batch_size=4, rank=0, world=1, accumulation=accumulation)
    two = [
        build_epoch(data, seq, epoch=1, batch_size=4, rank=r, world=2, accumulation=accumulation)
        for r in range(2)
    ]
    assert len(one.batches) % accumulation == 0  # whole optimizer steps only
    assert len(two[0].batches) == len(two[1].batches) == len(one.batches)
    for i, whole in enumerate(one.batches):
        halves = [two[r].batches[i] for r in range(2)]
        width = whole["input_ids"].shape[1]
        rows = torch.cat([torch.nn.functional.pad(h["input_ids"], (0, width - h["input_ids"].shape[1]), value=LAYOUT.eos_id) for h in halves])  # fmt: skip
        assert torch.equal(rows, whole["input_ids"])  # rank 0's rows, then rank 1's
        # the normalizer: the step's total target weight / (processes x accumulation)
        step = slice(i - i % accumulation, i - i % accumulation + accumulation)
        total = sum(target_weight(b) for b in one.batches[step])
        assert float(whole["normalizer"]) == pytest.approx(total / accumulation)
        assert float(halves[0]["normalizer"]) == float(halves[1]["normalizer"])
        assert float(halves[0]["normalizer"]) == pytest.approx(total / (2 * accumulation))


def test_epochs_differ_and_repeat():
    seq, data = SequenceConfig(max_length=24, seed=3), bank()
    a = build_epoch(data, seq, epoch=0, batch_size=4, rank=0, world=1)
    b = build_epoch(data, seq, epoch=1, batch_size=4, rank=0, world=1)
    again = build_epoch(data, seq, epoch=0, batch_size=4, rank=0, world=1)
    assert not torch.equal(a.batches[0]["input_ids"], b.batches[0]["input_ids"])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.batches, again.batches, strict=True))  # fmt: skip
    with pytest.raises(ValueError, match="does not split"):
        build_epoch(data, seq, epoch=0, batch_size=3, rank=0, world=2)
