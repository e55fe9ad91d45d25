"""Caption metrics: exact match, corpus BLEU-4, and, for shapes captions, per-attribute accuracy.

Text is normalised before it is compared: lower case, whitespace runs collapsed to one space, ends
stripped. BLEU tokens are the normalised text split on spaces (punctuation stays attached).

BLEU-4 is Papineni et al. (2002) at corpus level with one reference per prediction: clipped n-gram
counts (n = 1..4) summed over the corpus, uniform weights, geometric mean, no smoothing (any
precision 0 -> BLEU 0), times the brevity penalty exp(1 - r / c) when the total prediction length c
is at most the total reference length r.

Per-attribute scores appear only when every reference parses as a shapes caption: each prediction
is parsed too (a failure counts every attribute of its reference objects wrong), objects are
matched by position, and each of color / shape / size / position is the fraction of reference
objects the prediction got right. `object_count` is the fraction of captions with as many
objects as their reference.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

from vqgpt.data.shapes import ShapeObject, ShapesError, parse_caption
from vqgpt.eval.shape_checker import ATTRIBUTES, attribute_hits

MAX_ORDER = 4


class CaptionScores(NamedTuple):
    exact_match: float  # fraction equal after normalisation
    per_attribute: dict[str, float]  # color/shape/size/position/object_count; {} if not shapes
    bleu4: float
    n: int
    parse_failures: int  # predictions that are not shapes captions (0 when not shapes)


def normalize(text: str) -> str:
    """Lower case, one space between words, no leading or trailing space."""
    return " ".join(text.lower().split())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[str], max_order: int = MAX_ORDER) -> float:
    """Corpus BLEU (Papineni) with one reference each, uniform weights and brevity penalty."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    matched = [0] * max_order
    total = [0] * max_order
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = normalize(prediction).split(), normalize(reference).split()
        pred_len += len(pred)
        ref_len += len(ref)
        for n in range(1, max_order + 1):
            pred_counts, ref_counts = _ngrams(pred, n), _ngrams(ref, n)
            matched[n - 1] += sum(min(c, ref_counts[g]) for g, c in pred_counts.items())
            total[n - 1] += max(len(pred) - n + 1, 0)
    if min(matched) == 0:  # also covers an empty corpus and predictions shorter than max_order
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / max_order
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def _parse(text: str) -> list[ShapeObject] | None:
    try:
        return parse_caption(text)
    except ShapesError:
        return None


class _ShapesAgreement(NamedTuple):
    per_attribute: dict[str, float]
    parse_failures: int


def _shapes_agreement(
    predictions: list[str], references: list[list[ShapeObject]]
) -> _ShapesAgreement:
    """Per-attribute accuracy over reference objects, and object-count accuracy over captions."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    counts_right = failures = 0
    for prediction, expected in zip(predictions, references, strict=True):
        found = _parse(prediction)
        if found is None:
            failures += 1
            continue
        counts_right += len(found) == len(expected)
        for name, count in attribute_hits(expected, found).items():
            hits[name] += count
    num_objects = sum(len(objects) for objects in references)
    per_attribute = {name: hits[name] / num_objects for name in ATTRIBUTES}
    per_attribute["object_count"] = counts_right / len(references)
    return _ShapesAgreement(per_attribute, failures)


def caption_scores(predictions: list[str], references: list[str]) -> CaptionScores:
    """Exact match, corpus BLEU-4 and (for shapes captions) per-attribute accuracy."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("caption_scores needs at least one prediction/reference pair")
    exact = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    parsed = [_parse(r) for r in references]
    if all(objects is not None for objects in parsed):
        agreement = _shapes_agreement(predictions, parsed)
    else:  # not a shapes dataset: no attributes to score
        agreement = _ShapesAgreement({}, 0)
    return CaptionScores(
        exact_match=exact / len(references),
        per_attribute=agreement.per_attribute,
        bleu4=corpus_bleu(predictions, references),
        n=len(references),
        parse_failures=agreement.parse_failures,
    )


__all__ = ["CaptionScores", "caption_scores", "corpus_bleu", "normalize"]
