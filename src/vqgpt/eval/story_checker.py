"""Score what a model wrote for held-out shapes-story prompts (`data.stories.stories_prompts`).

Two exact checks, one per kind of prompt:

- image fidelity (prompts that end with a sentence, `asks_for == "image"`): the generated image is
  read by `shape_checker.read_objects`; it is right when it shows exactly the objects the sentence
  asked for (`same_objects`, as text-to-image's `all_match`). For a change sentence ("then the large
  red circle moves to the right.") that is the previous scene with the change applied.
- text faithfulness (prompts that end with an image, `asks_for == "text"`): the generated text's
  first sentence is read by the stories grammar (`scene_from_text`, against the true previous
  scene); it is right when the objects it names are exactly that image's. A description or a change
  sentence may be right, whichever the true story used. Text the grammar cannot read is wrong.

The answer to a prompt is the first segment the model wrote after it: when that segment is not of
the kind asked for (text where an image should open, or the reverse) or there is none, the prompt
counts as wrong and as `missing` (whitespace-only text is no segment). Both scores break down by the kind of the true sentence
(description / change): a change asks the model to carry the previous scene over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from vqgpt.data.shapes import ShapeObject
from vqgpt.data.stories import StoriesError, StoryPrompt, scene_from_text, segment_kind
from vqgpt.eval.shape_checker import ATTRIBUTES, ImageLike, attribute_hits, read_objects
from vqgpt.eval.shape_checker import same_objects as _same

Answer = str | ImageLike | None  # what a model wrote for one prompt (None: nothing of that kind)


class ImageFidelity(NamedTuple):
    accuracy: float  # share of image prompts whose image shows exactly the asked-for objects
    per_attribute: dict[str, float]  # over the asked-for objects (matched by position)
    by_kind: dict[str, float]  # accuracy per kind of the asking sentence (description, change)
    missing: int  # prompts answered with no image
    n: int


class TextFaithfulness(NamedTuple):
    accuracy: float  # share of text prompts whose text names exactly the image's objects
    by_kind: dict[str, float]  # accuracy per kind of the true sentence (description, change)
    unreadable: int  # texts the stories grammar cannot read, or that name an absent object
    missing: int  # prompts answered with no text
    n: int


class StoryScores(NamedTuple):
    image: ImageFidelity  # n = 0 (accuracy NaN) when no prompt asked for an image
    text: TextFaithfulness  # n = 0 (accuracy NaN) when no prompt asked for text

    def markdown(self) -> str:
        """Both scores as one Markdown table."""
        kinds = sorted(set(self.image.by_kind) | set(self.text.by_kind))
        head = "| stories (held-out prompts) | right | " + " | ".join(kinds) + " | missing | n |"
        rows = [head, "|---|---|" + "---|" * len(kinds) + "---|---|"]
        for name, s in (("image fidelity", self.image), ("text faithfulness", self.text)):
            cells = [
                name,
                percent(s.accuracy),
                *(percent(s.by_kind.get(k, math.nan)) for k in kinds),
            ]
            rows.append("| " + " | ".join([*cells, str(s.missing), str(s.n)]) + " |")
        return "\n".join(rows) + "\n"


def percent(x: float) -> str:
    """A share as '87.5%', NaN (no prompt of that kind) as '-'."""
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def answer_of(prompt: StoryPrompt, continuation: Sequence[dict]) -> Answer:
    """The answer in a continuation (segments written after the prompt): its first segment when
    that is of the kind the prompt asks for, else None. Whitespace-only text before it is skipped."""
    rest = [s for s in continuation if s.get("text") is None or s["text"].strip()]
    if not rest:
        return None
    first = rest[0]
    return first[prompt.asks_for] if segment_kind(first) == prompt.asks_for else None


def text_names(text: str, prompt: StoryPrompt) -> bool:
    """Whether `text` names exactly the objects of the image the prompt ends with."""
    try:
        return _same(scene_from_text(text, prompt.previous), prompt.expected)
    except StoriesError:
        return False


def _rate(hits: int, n: int) -> float:
    return hits / n if n else math.nan


def _by_kind(prompts: list[StoryPrompt], right: list[bool]) -> dict[str, float]:
    kinds = sorted({p.kind for p in prompts})
    return {
        k: _rate(sum(r for p, r in zip(prompts, right, strict=True) if p.kind == k), n)
        for k in kinds
        if (n := sum(p.kind == k for p in prompts))
    }


def image_fidelity(prompts: list[StoryPrompt], images: Sequence[ImageLike | None]) -> ImageFidelity:
    """Image fidelity over prompts that ask for an image (None: no image was written)."""
    right, hits, total = [], dict.fromkeys(ATTRIBUTES, 0), 0
    for prompt, image in zip(prompts, images, strict=True):
        found: list[ShapeObject] = [] if image is None else read_objects(image)
        right.append(image is not None and _same(found, prompt.expected))
        total += len(prompt.expected)
        for name, count in attribute_hits(prompt.expected, found).items():
            hits[name] += count
    return ImageFidelity(
        accuracy=_rate(sum(right), len(prompts)),
        per_attribute={name: _rate(hits[name], total) for name in ATTRIBUTES},
        by_kind=_by_kind(prompts, right),
        missing=sum(image is None for image in images),
        n=len(prompts),
    )


def text_faithfulness(prompts: list[StoryPrompt], texts: Sequence[str | None]) -> TextFaithfulness:
    """Text faithfulness over prompts that ask for text (None: no text was written)."""
    right = [t is not None and text_names(t, p) for p, t in zip(prompts, texts, strict=True)]
    missing = sum(t is None for t in texts)
    return TextFaithfulness(
        accuracy=_rate(sum(right), len(prompts)),
        by_kind=_by_kind(prompts, right),
        unreadable=len(prompts) - sum(right) - missing,
        missing=missing,
        n=len(prompts),
    )


def story_scores(prompts: Sequence[StoryPrompt], answers: Sequence[Answer]) -> StoryScores:
    """Image fidelity and text faithfulness of one answer per prompt (`answer_of` picks it out of
    a continuation): a PIL image / tensor / array for image prompts, a string for text prompts."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("story_scores needs at least one prompt")
    split: dict[str, tuple[list, list]] = {"image": ([], []), "text": ([], [])}
    for prompt, answer in zip(prompts, answers, strict=True):
        wrong_kind = isinstance(answer, str) != (prompt.asks_for == "text")
        split[prompt.asks_for][0].append(prompt)
        split[prompt.asks_for][1].append(None if answer is None or wrong_kind else answer)
    return StoryScores(image_fidelity(*split["image"]), text_faithfulness(*split["text"]))


__all__ = [
    "Answer",
    "ImageFidelity",
    "StoryScores",
    "TextFaithfulness",
    "answer_of",
    "image_fidelity",
    "percent",
    "story_scores",
    "text_faithfulness",
    "text_names",
]
