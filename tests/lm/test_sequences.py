"""Training sequences: layouts and label masks, caption dropout, truncation, packing, losses."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vqgpt.config import ConfigError, from_dict
from vqgpt.lm.sequences import (
    IGNORE_INDEX,
    PAD_TASK,
    Example,
    SequenceConfig,
    SequenceLengthError,
    build_caption,
    build_document,
    build_t2i,
    check_length,
    collate,
    fit,
    make_example,
    pack,
    t2i_prefix,
    token_budget,
    truncate,
)
from vqgpt.lm.vocab import VocabLayout

LAYOUT = VocabLayout(64, (2, 3))  # non-square, so row- vs column-major differ
EOS, BOI, EOI, OFF = LAYOUT.eos_id, LAYOUT.boi_id, LAYOUT.eoi_id, LAYOUT.image_offset
CODES = torch.tensor([[1, 2, 3], [4, 5, 6]])
IMG = [OFF + c for c in (1, 2, 3, 4, 5, 6)]  # row-major
CAP = [10, 11, 12]
M = IGNORE_INDEX


class CharEncoder:
    """A stand-in text tokenizer: one id per character."""

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) for c in text]


# -- hand-built sequences ---------------------------------------------------------------------


def test_t2i_layout_targets_and_weights():
    cfg = SequenceConfig(text_loss_weight=0.5, image_loss_weight=2.0, t2i_weight=3.0)
    ex = build_t2i(CODES, CAP, LAYOUT, cfg)
    assert ex.input_ids == [EOS, *CAP, BOI, *IMG, EOI, EOS]
    assert ex.labels == [M, M, M, M, BOI, *IMG, EOI, EOS]
    assert ex.loss_weights == [0.0] * 4 + [1.5] + [6.0] * 6 + [1.5, 1.5]
    assert ex.task == "t2i" and ex.task_ids == [0] * 13


def test_t2i_without_caption_is_unconditional():
    ex = build_t2i(CODES, [], LAYOUT, SequenceConfig())
    assert ex.input_ids == [EOS, BOI, *IMG, EOI, EOS]
    assert ex.labels == [M, BOI, *IMG, EOI, EOS]


def test_t2i_prefix_puts_boi_at_a_fixed_position():
    cfg = SequenceConfig(t2i_prefix_length=5)
    for caption in ([], [10], CAP, [10, 11, 12, 13]):
        ex = build_t2i(CODES, caption, LAYOUT, cfg)
        pad = [EOS] * (5 - len(caption))
        assert ex.input_ids == [*pad, *caption, BOI, *IMG, EOI, EOS]  # caption right before boi
        assert ex.input_ids.index(BOI) == 5  # so every image code sits at a fixed position
        assert ex.labels == [M] * 5 + [BOI, *IMG, EOI, EOS]
        assert ex.input_ids[:5] == t2i_prefix(caption, LAYOUT, 5)
    cut = build_t2i(CODES, [10, 11, 12, 13, 14, 15], LAYOUT, cfg)  # too long: tail cut
    assert cut.input_ids[:6] == [EOS, 10, 11, 12, 13, BOI]
    assert t2i_prefix(CAP, LAYOUT) == [EOS, *CAP]  # no prefix length: unpadded
    with pytest.raises(ValueError, match="does not fit t2i_prefix_length=3"):
        t2i_prefix(CAP, LAYOUT, 3)
    with pytest.raises(ConfigError, match="t2i_prefix_length"):
        SequenceConfig(t2i_prefix_length=1)
    SequenceConfig(max_length=LAYOUT.tokens_per_image + 8, t2i_prefix_length=5).check_fits(LAYOUT)
    with pytest.raises(ConfigError, match="cannot hold a t2i example"):
        SequenceConfig(max_length=LAYOUT.tokens_per_image + 7, t2i_prefix_length=5).check_fits(
            LAYOUT
        )


def test_caption_layout_targets_and_weights():
    cfg = SequenceConfig(text_loss_weight=0.5, image_loss_weight=2.0, caption_weight=4.0)
    ex = build_caption(CODES, CAP, LAYOUT, cfg)
    assert ex.input_ids == [EOS, BOI, *IMG, EOI, *CAP, EOS]
    assert ex.labels == [M] * 9 + [*CAP, EOS]
    assert ex.loss_weights == [0.0] * 9 + [2.0] * 4
    assert ex.task_ids == [1] * 13


def test_document_layout_targets_and_weights():
    cfg = SequenceConfig(text_loss_weight=0.5, image_loss_weight=2.0, t2i_weight=9.0)
    other = torch.zeros(2, 3, dtype=torch.long)
    ex = build_document(["ab", CODES, "c", other], LAYOUT, CharEncoder(), cfg)
    ids = [EOS, 97, 98, BOI, *IMG, EOI, 99, BOI, *[OFF] * 6, EOI, EOS]
    assert ex.input_ids == ids
    assert ex.labels == [M, *ids[1:]]
    text, image = 0.5, 2.0  # documents carry no task weight
    assert ex.loss_weights == [0.0, text, text, text, *[image] * 6, text, text, text] + [
        *[image] * 6,
        text,
        text,
    ]
    assert ex.task_ids == [2] * len(ids)
    unweighted = build_document(["ab", CODES], LAYOUT, CharEncoder())
    assert unweighted.loss_weights == [0.0] + [1.0] * (len(unweighted) - 1)


def test_a_document_opens_with_doc_where_the_layout_has_it():
    """With `<|doc|>` (an LM trained on documents) every document opens `eos doc`, a condition
    (no target), so an image-first document is not the captioning prompt `eos boi codes eoi`;
    the image ids move up by one and the rest of the sequence is as without it."""
    doc_layout = VocabLayout(64, (2, 3), special_tokens=("<|boi|>", "<|eoi|>", "<|doc|>"))
    assert LAYOUT.doc_id is None and doc_layout.doc_id == OFF
    assert (doc_layout.boi_id, doc_layout.eoi_id) == (BOI, EOI)
    assert doc_layout.image_offset == OFF + 1
    ex = build_document([CODES, "ab"], doc_layout, CharEncoder())
    img = [i + 1 for i in IMG]
    assert ex.input_ids == [EOS, OFF, BOI, *img, EOI, 97, 98, EOS]
    assert ex.labels == [M, M, BOI, *img, EOI, 97, 98, EOS]
    assert ex.loss_weights[:2] == [0.0, 0.0] and all(w > 0 for w in ex.loss_weights[2:])
    caption = build_caption(CODES, [97, 98], doc_layout, SequenceConfig())
    assert caption.input_ids[:2] == [EOS, BOI]  # the captioning prompt differs at token 2
    without = build_document([CODES, "ab"], LAYOUT, CharEncoder())
    assert without.input_ids == [EOS, BOI, *IMG, EOI, 97, 98, EOS]


def test_builders_reject_bad_inputs():
    cfg = SequenceConfig()
    with pytest.raises(ValueError, match="grid is \\(2, 3\\)"):
        build_t2i(CODES.T, CAP, LAYOUT, cfg)
    with pytest.raises(ValueError, match="\\[0, 64\\)"):
        build_caption(CODES + 60, CAP, LAYOUT, cfg)
    with pytest.raises(ValueError, match="encode_text"):
        build_t2i(CODES, [10, OFF], LAYOUT, cfg)
    with pytest.raises(TypeError, match="segment 1"):
        build_document(["a", 3], LAYOUT, CharEncoder())
    with pytest.raises(ValueError, match="differ in length"):
        Example([1, 2], [1], [1.0, 1.0], "t2i")


def test_sequence_config_validation():
    with pytest.raises(ConfigError, match="t2i_ratio"):
        SequenceConfig(t2i_ratio=1.5)
    with pytest.raises(ConfigError, match="caption_dropout"):
        SequenceConfig(caption_dropout=-0.1)
    with pytest.raises(ConfigError, match="image_loss_weight"):
        SequenceConfig(image_loss_weight=-1)
    with pytest.raises(ConfigError, match="max_length"):
        SequenceConfig(max_length=2)
    with pytest.raises(ConfigError, match="pak"):
        from_dict(SequenceConfig, {"pak": True})
    SequenceConfig(max_length=10).check_fits(LAYOUT)  # 6 codes + 4
    with pytest.raises(ConfigError, match="at least 10"):
        SequenceConfig(max_length=9).check_fits(LAYOUT)


# -- task mix and caption dropout -------------------------------------------------------------


def _draw(cfg: SequenceConfig, n: int) -> list[Example]:
    rng = random.Random(cfg.seed)
    return [make_example(CODES, CAP, LAYOUT, cfg, rng) for _ in range(n)]


def test_task_ratio_and_caption_dropout_rate():
    n = 4000
    examples = _draw(SequenceConfig(t2i_ratio=0.3, caption_dropout=0.25, seed=1), n)
    t2i = [ex for ex in examples if ex.task == "t2i"]
    dropped = [ex for ex in t2i if ex.input_ids[1] == BOI]
    # binomial: 4 standard deviations
    assert abs(len(t2i) / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert abs(len(dropped) / len(t2i) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(t2i))
    unconditional = build_t2i(CODES, [], LAYOUT, SequenceConfig())
    assert all(ex.input_ids == unconditional.input_ids for ex in dropped)
    captions = [ex for ex in examples if ex.task != "t2i"]
    assert len(captions) == n - len(t2i)
    assert all(ex.task == "caption" and ex.input_ids[-4:-1] == CAP for ex in captions)


def test_make_example_is_seeded_and_extremes():
    cfg = SequenceConfig(seed=7)
    assert [e.input_ids for e in _draw(cfg, 50)] == [e.input_ids for e in _draw(cfg, 50)]
    assert all(e.task == "t2i" for e in _draw(SequenceConfig(t2i_ratio=1.0), 50))
    assert all(e.task == "caption" for e in _draw(SequenceConfig(t2i_ratio=0.0), 50))
    kept = _draw(SequenceConfig(t2i_ratio=1.0, caption_dropout=0.0), 50)
    assert all(e.input_ids[1:4] == CAP for e in kept)
    dropped = _draw(SequenceConfig(t2i_ratio=1.0, caption_dropout=1.0), 50)
    assert all(e.input_ids[1] == BOI for e in dropped)


# -- truncation and packing -------------------------------------------------------------------


def assert_images_whole(ex: Example) -> None:
    """Every <|boi|> is followed by exactly h*w image codes and <|eoi|>; no stray codes."""
    ids, i, n = ex.input_ids, 0, LAYOUT.tokens_per_image
    while i < len(ids):
        if ids[i] == BOI:
            assert all(OFF <= t < LAYOUT.vocab_size for t in ids[i + 1 : i + 1 + n]), ids
            assert i + 1 + n < len(ids) and ids[i + 1 + n] == EOI, ids
            i += n + 2
        else:
            assert not (OFF <= ids[i] < LAYOUT.vocab_size) and ids[i] != EOI, ids
            i += 1


def test_truncate_t2i_cuts_caption_keeps_image():
    ex = build_t2i(CODES, list(range(20, 40)), LAYOUT, SequenceConfig())  # 1 + 20 + 8 + 1 = 30
    cut = truncate(ex, 15, LAYOUT)
    assert cut.input_ids == [EOS, 20, 21, 22, 23, 24, BOI, *IMG, EOI, EOS]
    assert cut.labels == [M] * 6 + ex.labels[-9:]
    assert cut.loss_weights == [0.0] * 6 + ex.loss_weights[-9:]
    assert truncate(ex, 11, LAYOUT).input_ids[:2] == [EOS, 20]  # one caption token left
    assert truncate(ex, 10, LAYOUT) is None  # the caption would vanish: not silently uncond.
    assert truncate(ex, 30, LAYOUT) is ex


def test_truncate_caption_and_document_cut_tail_not_images():
    cap = build_caption(CODES, list(range(20, 40)), LAYOUT, SequenceConfig())
    assert truncate(cap, 11, LAYOUT).input_ids == [EOS, BOI, *IMG, EOI, 20, 21]
    assert truncate(cap, 9, LAYOUT) is None  # image only: no target left
    assert truncate(cap, 5, LAYOUT) is None  # would split the image
    doc = build_document(["ab", CODES, "c"], LAYOUT, CharEncoder())  # 3 + 8 + 1 + 1 = 13
    assert truncate(doc, 7, LAYOUT).input_ids == [EOS, 97, 98]  # image dropped whole
    assert truncate(doc, 11, LAYOUT).input_ids == [EOS, 97, 98, BOI, *IMG, EOI]
    assert truncate(build_document([CODES], LAYOUT, CharEncoder()), 6, LAYOUT) is None


def random_example(rng: random.Random) -> Example:
    codes = torch.randint(
        0,
        LAYOUT.codebook_size,
        LAYOUT.grid,
        generator=torch.Generator().manual_seed(rng.randrange(10**6)),
    )
    caption = [rng.randrange(50000) for _ in range(rng.randrange(0, 25))]
    kind = rng.choice(["t2i", "caption", "document"])
    if kind == "t2i":
        return build_t2i(codes, caption, LAYOUT, SequenceConfig())
    if kind == "caption":
        return build_caption(codes, caption, LAYOUT, SequenceConfig())
    segments = [
        codes if rng.random() < 0.4 else "x" * rng.randrange(1, 12)
        for _ in range(rng.randrange(1, 6))
    ]
    return build_document(segments, LAYOUT, CharEncoder())


def test_truncate_property_never_splits_images():
    rng = random.Random(0)
    for _ in range(500):
        ex = random_example(rng)
        max_length = rng.randrange(4, 40)
        cut = truncate(ex, max_length, LAYOUT)
        if cut is None:
            continue
        assert len(cut) <= max_length and cut.num_targets > 0
        assert_images_whole(cut)
        if ex.task != "t2i":
            assert cut.input_ids == ex.input_ids[: len(cut)]  # a prefix
        else:  # a shorter caption, the same image segment and eos
            assert cut.input_ids[-9:] == ex.input_ids[-9:]
            assert cut.input_ids[: len(cut) - 9] == ex.input_ids[: len(cut) - 9]


def test_pack_property_windows_full_ordered_images_whole():
    rng = random.Random(1)
    for trial in range(20):
        max_length = rng.randrange(12, 64)
        examples = [random_example(rng) for _ in range(rng.randrange(1, 30))]
        fitted, skipped = fit(examples, LAYOUT, SequenceConfig(max_length=max_length))
        kept = [truncate(ex, max_length, LAYOUT) for ex in examples]
        kept = [ex for ex in kept if ex is not None]
        assert skipped == len(examples) - len(kept)
        content: list[int] = []
        for window in fitted:
            assert len(window) == max_length
            real = [t != PAD_TASK for t in window.task_ids]
            n_real = sum(real)
            assert real == [True] * n_real + [False] * (max_length - n_real)  # pads at the tail
            pad = slice(n_real, None)
            assert set(window.input_ids[pad]) <= {EOS} and set(window.labels[pad]) <= {IGNORE_INDEX}
            assert set(window.loss_weights[pad]) <= {0.0}
            assert_images_whole(window)
            content += window.input_ids[:n_real]
        assert content == [t for ex in kept for t in ex.input_ids]
        # greedy: each window holds exactly the examples that fit before the next overflows
        lengths = [len(ex) for ex in kept]
        i = 0
        for window in fitted:
            used = 0
            while i < len(lengths) and used + lengths[i] <= max_length:
                used += lengths[i]
                i += 1
            assert used == sum(t != PAD_TASK for t in window.task_ids)
        assert i == len(lengths), trial


def test_pack_rejects_overlong_and_fit_without_packing():
    long = build_caption(CODES, list(range(30)), LAYOUT, SequenceConfig())
    with pytest.raises(ValueError, match="truncate"):
        pack([long], 20, EOS)
    fitted, skipped = fit([long, long], LAYOUT, SequenceConfig(max_length=20, pack=False))
    assert skipped == 0 and [len(ex) for ex in fitted] == [20, 20]
    _, skipped = fit([long], LAYOUT, SequenceConfig(max_length=9, pack=False))
    assert skipped == 1


def test_pack_mixed_tasks_keeps_per_position_task_ids():
    cfg = SequenceConfig()
    t2i, cap = build_t2i(CODES, CAP, LAYOUT, cfg), build_caption(CODES, CAP, LAYOUT, cfg)
    (window,) = pack([t2i, cap], 30, EOS)
    assert window.task == "mixed"
    assert window.task_ids == [0] * 13 + [1] * 13 + [PAD_TASK] * 4
    assert window.input_ids == t2i.input_ids + cap.input_ids + [EOS] * 4
    (same,) = pack([t2i, t2i], 26, EOS)
    assert same.task == "t2i"


# -- batching and losses ----------------------------------------------------------------------


def test_collate_pads_and_masks():
    cfg = SequenceConfig()
    short = build_t2i(CODES, [], LAYOUT, cfg)  # 10
    (window,) = pack([build_caption(CODES, CAP, LAYOUT, cfg)], 16, EOS)  # 13 + 3 pad
    batch = collate([short, window], pad_id=EOS)
    assert set(batch) == {"input_ids", "labels", "loss_weights", "attention_mask", "task_ids"}
    for value in batch.values():
        assert value.shape == (2, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["loss_weights"].dtype == torch.float32
    assert batch["input_ids"][0].tolist() == short.input_ids + [EOS] * 6
    assert batch["labels"][0, 10:].tolist() == [IGNORE_INDEX] * 6
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0] * 6, [1] * 13 + [0] * 3]
    assert batch["task_ids"].tolist() == [[0] * 10 + [PAD_TASK] * 6, [1] * 13 + [PAD_TASK] * 3]
    assert batch["loss_weights"][1].tolist() == window.loss_weights


def test_token_budget_is_what_the_longest_training_examples_take():
    n_positions = 30
    budget = token_budget(n_positions, LAYOUT)
    assert budget.caption == budget.t2i_caption == n_positions - LAYOUT.tokens_per_image - 4
    caption = [5] * budget.caption
    cfg = SequenceConfig(max_length=n_positions)
    for build in (build_t2i, build_caption):  # the longest caption fills the table exactly
        assert len(build(CODES, caption, LAYOUT, cfg)) == n_positions
    assert token_budget(n_positions, LAYOUT, t2i_prefix_length=4).t2i_caption == 3
    with pytest.raises(SequenceLengthError, match="cannot hold one image"):
        token_budget(LAYOUT.tokens_per_image + 3, LAYOUT)
    check_length(n_positions, n_positions, "x")
    with pytest.raises(SequenceLengthError, match="x has 31 tokens"):
        check_length(n_positions + 1, n_positions, "x")


def test_a_stored_document_cuts_inside_text_or_between_segments_only():
    # a pretokenized document: text segments as BPE ids, images as codes
    doc = build_document([[10, 11, 12], CODES, [13], CODES.flip(0), [14, 15]], LAYOUT, None)
    image = 1 + 6 + 1  # boi codes eoi
    assert len(doc) == 1 + 3 + image + 1 + image + 2 + 1
    starts = [4, 13]  # the two boi positions
    for max_length in range(1, len(doc) + 1):
        cut = truncate(doc, max_length, LAYOUT)
        if cut is None:
            assert max_length == 1  # the leading eos alone: no target
            continue
        assert cut.input_ids == doc.input_ids[: len(cut)] and len(cut) <= max_length
        for start in starts:  # an image is in whole or not at all
            assert len(cut) <= start or len(cut) >= start + image
    with pytest.raises(ValueError, match="text tokens"):
        build_document([[LAYOUT.text_vocab_size]], LAYOUT, None)
    with pytest.raises(TypeError, match="pass a tokenizer"):
        build_document(["text"], LAYOUT, None)
