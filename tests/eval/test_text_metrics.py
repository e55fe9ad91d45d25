"""Caption metrics: BLEU-4 against hand-computed cases, exact match, shapes attributes."""

from __future__ import annotations

import math

import pytest

from vqgpt.eval.text_metrics import caption_scores, corpus_bleu, normalize

REF = "a large red circle at the top left and a small blue square at the bottom right"


def test_bleu_perfect_is_one():
    refs = ["a b c d e", REF]
    assert corpus_bleu(refs, refs) == pytest.approx(1.0)


def test_bleu_without_a_shared_4gram_is_zero():
    assert corpus_bleu(["a b c d"], ["a b c e"]) == 0.0
    assert corpus_bleu(["a b c"], ["a b c"]) == 0.0  # too short to have any 4-gram
    assert corpus_bleu([""], ["a b c d"]) == 0.0


def test_bleu_hand_computed():
    # same length: precisions 5/6, 4/5, 3/4, 2/3 -> (1/3) ** (1/4)
    assert corpus_bleu(["a b c d e x"], ["a b c d e f"]) == pytest.approx((1 / 3) ** 0.25)
    # longer than the reference: no penalty; precisions 4/8, 3/7, 2/6, 1/5
    expected = (4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25
    assert corpus_bleu(["a b c d e f g h"], ["a b c d"]) == pytest.approx(expected)


def test_bleu_brevity_penalty():
    # every n-gram right but half the length: exp(1 - 8 / 4)
    assert corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(math.exp(-1))


def test_bleu_is_corpus_level_not_a_sentence_average():
    # the second pair alone has no matching 4-gram; summed counts are 8/9, 5/7, 3/5, 1/3
    preds, refs = ["a b c d", "a b c d e"], ["a b c d", "a b c x e"]
    assert corpus_bleu(preds[1:], refs[1:]) == 0.0
    expected = (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25
    assert corpus_bleu(preds, refs) == pytest.approx(expected)


def test_bleu_clips_repeated_ngrams():
    # "the" appears twice in the reference, so only 2 of 7 count
    pred, ref = "the the the the the the the", "the cat is on the mat"
    assert corpus_bleu([pred], [ref], max_order=1) == pytest.approx(2 / 7)


def test_bleu_ignores_case_and_spacing():
    assert corpus_bleu(["A  B c D"], ["a b C d"]) == pytest.approx(1.0)


def test_exact_match_normalises_whitespace_and_case():
    assert normalize("  A  Large\tRED circle \n") == "a large red circle"
    scores = caption_scores([f"  {REF.upper()}  ", REF.replace("red", "green")], [REF, REF])
    assert scores.exact_match == 0.5
    assert scores.n == 2


def test_per_attribute_on_hand_built_pairs():
    refs = [REF, "a small green triangle at the center", "a large white diamond at the top"]
    preds = [
        # shape wrong on the first object, size wrong on the second
        "a large red square at the top left and a large blue square at the bottom right",
        "a small green triangle at the left",  # right object, wrong cell: nothing matches
        "a dog",  # not a shapes caption
    ]
    scores = caption_scores(preds, refs)
    assert scores.parse_failures == 1
    assert scores.per_attribute == pytest.approx(
        {"color": 2 / 4, "shape": 1 / 4, "size": 1 / 4, "position": 2 / 4, "object_count": 2 / 3}
    )
    assert scores.exact_match == 0.0


def test_per_attribute_counts_missing_and_extra_objects():
    one = "a small red circle at the top"
    scores = caption_scores([one, f"{one} and a large red circle at the center"], [REF, one])
    # REF's two objects are missed; the extra object of the second prediction costs only the count
    assert scores.per_attribute == pytest.approx(
        {"color": 1 / 3, "shape": 1 / 3, "size": 1 / 3, "position": 1 / 3, "object_count": 0.0}
    )
    assert scores.parse_failures == 0


def test_perfect_shapes_captions():
    scores = caption_scores([REF], [REF])
    assert scores == (1.0, {k: 1.0 for k in scores.per_attribute}, pytest.approx(1.0), 1, 0)
    assert set(scores.per_attribute) == {"color", "shape", "size", "position", "object_count"}


def test_non_shapes_references_have_no_attributes():
    scores = caption_scores(["a photo of a dog"], ["a photo of a dog on grass"])
    assert scores.per_attribute == {}
    assert scores.parse_failures == 0
    assert scores.exact_match == 0.0
    assert scores.bleu4 == pytest.approx(math.exp(1 - 7 / 5))  # exact prefix, penalised length


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        caption_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        caption_scores([], [])
    with pytest.raises(ValueError, match="1 predictions but 0 references"):
        corpus_bleu(["a"], [])
