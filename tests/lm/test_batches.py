"""Per-epoch batches of stage two: what each process trains on, and the loss's normalizer."""

from __future__ import annotations

import dataclasses
import random
import tracemalloc

import pytest
import torch

from vqgpt.lm import batches as batches_module
from vqgpt.lm.batches import DocumentBank, ExampleBank, build_epoch, shuffled_rows
from vqgpt.lm.sequences import TASK_IDS, SequenceConfig, collate, fit, make_example
from vqgpt.lm.vocab import JointTokenizer, VocabLayout

LAYOUT = VocabLayout(codebook_size=8, grid=(2, 2), text_vocab_size=30)


@pytest.fixture
def bank(memory_bank):
    """(n, longest caption) -> a bank of n seeded rows, captions of 0..longest tokens."""

    def make(n: int = 40, longest: int = 5) -> ExampleBank:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 8, (n, 2, 2), generator=gen)
        lengths = [i % (longest + 1) for i in range(n)]
        text_ids = [torch.randint(0, 29, (k,), generator=gen).tolist() for k in lengths]
        return memory_bank(codes, text_ids, LAYOUT)

    return make


def eager_epoch(bank, seq, epoch, batch_size, rank, world, accumulation=1):
    """The eager build_epoch this module's lazy one replaced (every example of the epoch in
    memory at once): the reference it must match batch for batch."""
    rng = random.Random(f"vqgpt-lm-{seq.seed}-{epoch}")
    order = list(range(len(bank)))
    rng.shuffle(order)
    rows = bank.read(range(len(bank)))
    examples = [make_example(rows.codes[i], rows.text_ids[i], bank.layout, seq, rng) for i in order]
    fitted = fit(examples, bank.layout, seq)
    windows = fitted.examples
    per_step = batch_size * accumulation
    b = batch_size // world
    out = []
    for s in range(len(windows) // per_step):
        step_windows = windows[s * per_step : (s + 1) * per_step]
        weight = sum(sum(w.loss_weights[1:]) for w in step_windows)
        normalizer = torch.tensor(max(weight, 1e-12) / (world * accumulation))
        for m in range(accumulation):
            start = s * per_step + m * batch_size + rank * b
            batch = collate(windows[start : start + b], pad_id=bank.layout.eos_id)
            batch["normalizer"] = normalizer
            out.append(batch)
    return out, fitted.skipped


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key


def target_weight(batch: dict) -> float:
    return float(batch["loss_weights"][:, 1:].sum())


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 257, 5000])
@pytest.mark.parametrize("seed", ["vqgpt-lm-0-0", "vqgpt-lm-3-7"])
def test_shuffled_rows_is_random_shuffle(n, seed):
    reference, ours = random.Random(seed), random.Random(seed)
    order = list(range(n))
    reference.shuffle(order)
    assert list(shuffled_rows(n, ours)) == order
    assert ours.random() == reference.random()  # the same draws: the task choices follow on


SEQUENCES = {
    "packed": SequenceConfig(max_length=24, pack=True, seed=3),
    "rows, prefix, more t2i and dropout": SequenceConfig(
        max_length=24, pack=False, t2i_prefix_length=6, t2i_ratio=0.7, caption_dropout=0.3, seed=1
    ),
    # max_length 8 holds eos boi 4 codes eoi eos only: a t2i example with a caption is skipped
    "packed, too long": SequenceConfig(max_length=8, pack=True, seed=2),
    "rows, too long": SequenceConfig(max_length=8, pack=False, t2i_ratio=0.9, seed=4),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_lazy_epoch_is_the_eager_epoch(bank, monkeypatch, name, world, accumulation):
    monkeypatch.setattr(batches_module, "READ_ROWS", 7)  # several reads, one cut mid-step
    seq, data = SEQUENCES[name], bank(53)
    for rank in range(world):
        want, skipped = eager_epoch(data, seq, 1, 4, rank, world, accumulation)
        built = build_epoch(data, seq, 1, 4, rank, world, accumulation)
        assert built.skipped == 0 and built.steps == 0  # nothing is built before iterating
        assert_same_batches(list(built), want)
        assert want and built.steps == len(want) // accumulation
        assert built.skipped == skipped
        assert (skipped > 0) == name.endswith("too long")
        assert_same_batches(list(built), want)  # iterating again builds the same epoch


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_skips_the_first_micro_batches_without_collating_them(
    bank, monkeypatch, accumulation
):
    seq, data = SEQUENCES["packed"], bank(60)
    full = list(build_epoch(data, seq, 2, 4, 1, 2, accumulation))
    collated = []

    def counting_collate(*args, **kwargs):
        collated.append(1)
        return collate(*args, **kwargs)

    monkeypatch.setattr(batches_module, "collate", counting_collate)
    for skip in (0, 1, 2, 3, len(full) - 1, len(full), len(full) + 2):
        collated.clear()
        built = build_epoch(data, seq, 2, 4, 1, 2, accumulation, skip=skip)
        assert_same_batches(list(built), full[skip:])
        assert len(collated) == max(len(full) - skip, 0)
        assert built.steps == len(full) // accumulation  # the whole epoch was built


def test_an_epoch_too_small_for_one_step_has_no_batches(bank):
    built = build_epoch(bank(3), SequenceConfig(max_length=24, pack=False), 0, 4, 0, 1)
    assert list(built) == [] and built.steps == 0  # train_lm's ConfigError reads steps


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ranks_split_each_global_batch_and_share_its_normalizer(bank, accumulation):
    seq = SequenceConfig(max_length=24, pack=True, seed=3)
    data = bank()
    one = list(build_epoch(data, seq, 1, batch_size=4, rank=0, world=1, accumulation=accumulation))
    two = [
        list(build_epoch(data, seq, 1, batch_size=4, rank=r, world=2, accumulation=accumulation))
        for r in range(2)
    ]
    assert len(one) % accumulation == 0  # whole optimizer steps only
    assert len(two[0]) == len(two[1]) == len(one)
    for i, whole in enumerate(one):
        halves = [two[r][i] for r in range(2)]
        width = whole["input_ids"].shape[1]
        rows = torch.cat([torch.nn.functional.pad(h["input_ids"], (0, width - h["input_ids"].shape[1]), value=LAYOUT.eos_id) for h in halves])  # fmt: skip
        assert torch.equal(rows, whole["input_ids"])  # rank 0's rows, then rank 1's
        # the normalizer: the step's total target weight / (processes x accumulation)
        step = slice(i - i % accumulation, i - i % accumulation + accumulation)
        total = sum(target_weight(b) for b in one[step])
        assert float(whole["normalizer"]) == pytest.approx(total / accumulation)
        assert float(halves[0]["normalizer"]) == float(halves[1]["normalizer"])
        assert float(halves[0]["normalizer"]) == pytest.approx(total / (2 * accumulation))


def test_epochs_differ_and_repeat(bank):
    seq, data = SequenceConfig(max_length=24, seed=3), bank()
    a = list(build_epoch(data, seq, epoch=0, batch_size=4, rank=0, world=1))
    b = list(build_epoch(data, seq, epoch=1, batch_size=4, rank=0, world=1))
    assert not torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert_same_batches(list(build_epoch(data, seq, epoch=0, batch_size=4, rank=0, world=1)), a)
    with pytest.raises(ValueError, match="does not split"):
        build_epoch(data, seq, epoch=0, batch_size=3, rank=0, world=2)


def test_bank_reads_rows_in_the_order_asked_and_checks_the_grid(memory_bank):
    codes = torch.arange(5 * 4).reshape(5, 2, 2) % 8
    data = memory_bank(codes, [[i] * i for i in range(5)], LAYOUT)
    rows = data.read([4, 0, 2])
    assert torch.equal(rows.codes, codes[[4, 0, 2]]) and rows.codes.dtype == torch.long
    assert rows.text_ids == [[4] * 4, [], [2, 2]]
    assert data.read([]).codes.shape == (0, 2, 2) and len(data) == 5
    with pytest.raises(ValueError, match=r"grid \(2, 2\).*makes \(2, 3\).*pretokenize again"):
        ExampleBank(data.rows, JointTokenizer.build(8, (2, 3)), data.image_tokenizer_dir)


def test_an_epoch_over_a_large_split_does_not_hold_it(load_script, tmp_path):
    """50,000 rows of 8x8 codes on disk (6.4 MB as int16, 26 MB as a LongTensor; their captions'
    ids as lists far more): opening the bank and building a few steps allocates a small part of
    it, the shuffled order (4 bytes a row) included."""
    bench = load_script("bench_lm_memory")  # its writer makes the split as pretokenize does
    rows = 50_000
    bench.write_codes(tmp_path, "train", rows)
    from vqgpt.lm.arrow_rows import ArrowRows
    from vqgpt.lm.pretokenize import codes_files

    tokenizer = JointTokenizer.build(bench.CODEBOOK_SIZE, bench.GRID)
    seq = SequenceConfig(max_length=88, pack=False, t2i_prefix_length=20)
    tracemalloc.start()
    try:
        data = ExampleBank(ArrowRows(codes_files(tmp_path, "train")), tokenizer, tmp_path)
        built = iter(build_epoch(data, seq, epoch=0, batch_size=16, rank=0, world=1))
        for _ in range(5):
            assert next(built)["input_ids"].shape[0] == 16
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    codes_bytes = rows * 64 * 2  # int16
    assert peak < codes_bytes / 4, f"peak {peak / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# documents mixed in


@pytest.fixture
def documents(memory_documents):
    """(n) -> a bank of n seeded documents of 1..4 segments (text ids and 2x2 images)."""

    def make(n: int = 30) -> DocumentBank:
        gen = torch.Generator().manual_seed(1)
        docs = []
        for i in range(n):
            segments = []
            for s in range(1 + i % 4):
                if (i + s) % 2:
                    segments.append(torch.randint(0, 8, (2, 2), generator=gen))
                else:
                    segments.append(torch.randint(0, 29, (1 + s,), generator=gen).tolist())
            docs.append(segments)
        return memory_documents(docs, LAYOUT)

    return make


def tasks_of(batches: list[dict]) -> list[int]:
    """The task of each row (one example per row: pack off)."""
    return [int(row[0]) for b in batches for row in b["task_ids"]]


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_document_ratio_0_is_the_epoch_without_documents(bank, documents, name):
    seq, data = SEQUENCES[name], bank(53)
    for rank, world in ((0, 1), (1, 2)):
        want, _ = eager_epoch(data, seq, 1, 4, rank, world)
        got = list(build_epoch(data, seq, 1, 4, rank, world, documents=documents()))
        assert_same_batches(got, want)


def test_documents_mix_in_at_their_ratio_deterministically(bank, documents):
    seq = SequenceConfig(max_length=24, pack=False, document_ratio=0.3, seed=5)
    data, docs = bank(400), documents()
    epoch = list(build_epoch(data, seq, 0, 4, 0, 1, documents=docs))
    tasks = tasks_of(epoch)
    share = tasks.count(TASK_IDS["document"]) / len(tasks)
    assert 0.25 < share < 0.35  # ~570 examples: the binomial sd of the share is ~0.02
    # the rest split by t2i_ratio as before
    t2i = tasks.count(TASK_IDS["t2i"]) / (len(tasks) - tasks.count(TASK_IDS["document"]))
    assert 0.42 < t2i < 0.58
    # every document cycles through (a shuffled order, reshuffled when used up)
    assert tasks.count(TASK_IDS["document"]) > len(docs)
    assert_same_batches(list(build_epoch(data, seq, 0, 4, 0, 1, documents=docs)), epoch)
    other = list(build_epoch(data, seq, 1, 4, 0, 1, documents=docs))
    assert tasks_of(other) != tasks
    reseeded = SequenceConfig(max_length=24, pack=False, document_ratio=0.3, seed=6)
    assert tasks_of(list(build_epoch(data, reseeded, 0, 4, 0, 1, documents=docs))) != tasks
    with pytest.raises(ValueError, match="document_ratio=0.3 needs documents"):
        build_epoch(data, seq, 0, 4, 0, 1)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_documents_two_ranks_train_as_one(bank, documents, accumulation):
    seq = SequenceConfig(max_length=24, pack=True, document_ratio=0.4, seed=3)
    data, docs = bank(), documents()
    one = list(build_epoch(data, seq, 1, 4, 0, 1, accumulation, documents=docs))
    two = [list(build_epoch(data, seq, 1, 4, r, 2, accumulation, documents=docs)) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == len(one) > 0
    assert any(TASK_IDS["document"] in b["task_ids"] for b in one)
    for i, whole in enumerate(one):
        for key in ("input_ids", "labels", "loss_weights", "task_ids"):
            width = whole[key].shape[1]
            fill = {"input_ids": LAYOUT.eos_id, "labels": -100, "loss_weights": 0.0, "task_ids": -1}
            rows = torch.cat([torch.nn.functional.pad(two[r][i][key], (0, width - two[r][i][key].shape[1]), value=fill[key]) for r in (0, 1)])  # fmt: skip
            assert torch.equal(rows, whole[key]), key
        assert float(two[0][i]["normalizer"]) * 2 == pytest.approx(float(whole["normalizer"]))


def test_document_bank_reads_segments_in_order(memory_documents):
    a = [[1, 2], torch.tensor([[0, 1], [2, 3]]), [], torch.tensor([[7, 7], [6, 5]])]
    b = [torch.tensor([[4, 4], [4, 4]])]
    docs = memory_documents([a, b, [[5]]], LAYOUT)
    got = docs.read([1, 0, 2, 0])

    def plain(doc):
        return [s if isinstance(s, list) else ("codes", s.tolist()) for s in doc]

    assert [plain(d) for d in got] == [plain(b), plain(a), [[5]], plain(a)]
    assert all(s.dtype == torch.long for s in got[1] if isinstance(s, torch.Tensor))
    with pytest.raises(ValueError, match=r"document codes have grid \(2, 2\)"):
        DocumentBank(docs.rows, JointTokenizer.build(8, (2, 3)))


def rows_of(batches: list[dict]) -> list[tuple[int, ...]]:
    """Each row's unpadded ids (padding: labels -100 at the end of the row)."""
    out = []
    for b in batches:
        for ids, weights in zip(b["input_ids"], b["loss_weights"], strict=True):
            n = int((weights != 0).nonzero().max()) + 1 if bool((weights != 0).any()) else 1
            out.append(tuple(ids[:n].tolist()))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_group_by_length_keeps_each_step_and_cuts_the_padding(bank, documents, world):
    """Unpacked rows of mixed lengths (documents among short t2i / caption rows): grouped, each
    optimizer step holds the same rows and normalizer, and its micro-batches pad less."""
    base = SequenceConfig(max_length=40, pack=False, document_ratio=0.4, seed=2)
    grouped = dataclasses.replace(base, group_by_length=True)
    data, docs, acc = bank(120), documents(), 4

    def epoch(seq):  # each rank's micro-batches
        return [
            list(build_epoch(data, seq, 0, 2 * world, r, world, acc, documents=docs))
            for r in range(world)
        ]

    plain, by_len = epoch(base), epoch(grouped)
    assert len(plain[0]) == len(by_len[0]) > 0
    for s in range(len(plain[0]) // acc):
        step = slice(s * acc, (s + 1) * acc)
        want = sorted(r for rank in plain for r in rows_of(rank[step]))
        got = sorted(r for rank in by_len for r in rows_of(rank[step]))
        assert got == want  # the same rows in each step, across ranks
        for rank in range(world):
            assert all(
                float(a["normalizer"]) == float(b["normalizer"])
                for a, b in zip(plain[rank][step], by_len[rank][step], strict=True)
            )
    width = sum(b["input_ids"].numel() for rank in plain for b in rank)
    width_grouped = sum(b["input_ids"].numel() for rank in by_len for b in rank)
    assert width_grouped < width  # the padded token count falls (by 8% here: short docs)
    if world == 1:  # a step's micro-batches go from its shortest rows to its longest
        for s in range(len(by_len[0]) // acc):
            widths = [b["input_ids"].shape[1] for b in by_len[0][s * acc : (s + 1) * acc]]
            assert widths == sorted(widths)


# ---------------------------------------------------------------------------------------------
# sequences.image_input_noise: the noisy context (reAR's "switch" perturbation)


def test_noisy_context_switches_only_the_codes_a_row_draws():
    from vqgpt.lm.sequences import IGNORE_INDEX, build_caption, build_t2i, noisy_context

    seq = SequenceConfig(max_length=24, pack=False)
    codes = torch.tensor([[1, 2], [3, 4]])
    t2i = build_t2i(codes, [5, 6, 7], LAYOUT, seq)
    flips, spots = 0, 0
    for i in range(400):
        got = noisy_context(t2i, LAYOUT, 1.0, random.Random(i))
        assert got.labels == t2i.labels and got.loss_weights == t2i.loss_weights
        for a, b, y in zip(t2i.input_ids, got.input_ids, t2i.labels, strict=True):
            drawn = LAYOUT.image_offset <= a < LAYOUT.vocab_size and y != IGNORE_INDEX
            assert a == b or (drawn and LAYOUT.image_offset <= b < LAYOUT.vocab_size)
            spots += drawn
            flips += a != b
    # r ~ U(0, 1), each switch to one of K = 8 codes (1 in 8 draws its own code again):
    # E[changed] = 0.5 * 7 / 8 of the drawn codes
    assert 0.38 < flips / spots < 0.49
    caption = build_caption(codes, [5, 6, 7], LAYOUT, seq)  # codes read, not drawn
    assert noisy_context(caption, LAYOUT, 1.0, random.Random(0)).input_ids == caption.input_ids
    assert noisy_context(t2i, LAYOUT, 0.0, random.Random(0)).input_ids == t2i.input_ids


@pytest.mark.parametrize("accumulation", [1, 2])
def test_noisy_context_is_the_same_at_two_ranks_and_after_a_resume(bank, documents, accumulation):
    clean = SequenceConfig(max_length=24, pack=False, document_ratio=0.4, seed=3)
    noisy = dataclasses.replace(clean, image_input_noise=0.5, group_by_length=True)
    data, docs = bank(), documents()
    one = list(build_epoch(data, noisy, 1, 4, 0, 1, accumulation, documents=docs))
    plain = list(build_epoch(data, dataclasses.replace(noisy, image_input_noise=0.0), 1, 4, 0, 1, accumulation, documents=docs))  # fmt: skip
    assert len(one) == len(plain) > 0
    for got, want in zip(one, plain, strict=True):  # only image inputs differ, never targets
        assert torch.equal(got["labels"], want["labels"])
        changed = got["input_ids"] != want["input_ids"]
        assert bool(LAYOUT.is_image(got["input_ids"][changed]).all())
    assert any(
        bool((g["input_ids"] != w["input_ids"]).any()) for g, w in zip(one, plain, strict=True)
    )
    two = [list(build_epoch(data, noisy, 1, 4, r, 2, accumulation, documents=docs)) for r in (0, 1)]
    for i, whole in enumerate(one):
        width = whole["input_ids"].shape[1]
        rows = torch.cat([torch.nn.functional.pad(two[r][i]["input_ids"], (0, width - two[r][i]["input_ids"].shape[1]), value=LAYOUT.eos_id) for r in (0, 1)])  # fmt: skip
        assert torch.equal(rows, whole["input_ids"])
    resumed = list(build_epoch(data, noisy, 1, 4, 0, 1, accumulation, skip=3, documents=docs))
    assert_same_batches(resumed, one[3:])
