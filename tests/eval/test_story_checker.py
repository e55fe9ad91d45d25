"""The story checker: 100% on the true images and sentences, low on shuffled ones, and answers of
the wrong kind or none at all count as wrong."""

import math

import pytest
from PIL import Image

from vqgpt.data.stories import StoriesConfig, make_story, stories_prompts
from vqgpt.eval.story_checker import answer_of, story_scores, text_names

CFG = StoriesConfig(num_test_stories=24)


@pytest.fixture(scope="module")
def truth():
    """Held-out prompts and the true answer of each: the image or the sentence that came next."""
    prompts = stories_prompts(CFG, "test")
    answers = []
    for p in prompts:
        story = make_story(CFG, p.story, "test")
        scene = story.story.scenes[p.scene]
        index = scene.image_segment if p.asks_for == "image" else scene.text_segment
        continuation = story.segments[index:]
        answers.append(answer_of(p, continuation))
    return prompts, answers


def test_the_truth_scores_100_percent(truth):
    prompts, answers = truth
    scores = story_scores(prompts, answers)
    assert scores.image.n + scores.text.n == len(prompts) and min(scores.image.n, scores.text.n) > 5
    assert scores.image.accuracy == 1.0 and scores.text.accuracy == 1.0
    assert set(scores.image.per_attribute.values()) == {1.0}
    assert scores.image.by_kind == {"change": 1.0, "description": 1.0}
    assert scores.text.by_kind == {"change": 1.0, "description": 1.0}
    assert scores.image.missing == scores.text.missing == scores.text.unreadable == 0
    table = scores.markdown()
    assert "| image fidelity | 100.0% |" in table and "| text faithfulness | 100.0% |" in table


def test_shuffled_answers_score_low(truth):
    prompts, answers = truth
    # each prompt gets the answer of a prompt of the same kind further down the list
    by_kind = {k: [i for i, p in enumerate(prompts) if p.asks_for == k] for k in ("image", "text")}
    shuffled = list(answers)
    for idx in by_kind.values():
        for i, j in zip(idx, idx[3:] + idx[:3], strict=True):
            shuffled[i] = answers[j]
    scores = story_scores(prompts, shuffled)
    assert scores.image.accuracy < 0.2 and scores.text.accuracy < 0.2
    assert scores.image.missing == scores.text.missing == 0


def test_wrong_kind_or_nothing_is_missing(truth):
    prompts, answers = truth
    image = next(a for a in answers if isinstance(a, Image.Image))
    swapped = [image if isinstance(a, str) else "a large red circle at the top." for a in answers]
    scores = story_scores(prompts, swapped)
    assert scores.image.accuracy == 0.0 and scores.image.missing == scores.image.n
    assert scores.text.accuracy == 0.0 and scores.text.missing == scores.text.n
    nothing = story_scores(prompts, [None] * len(prompts))
    assert nothing.image.missing == nothing.image.n and nothing.text.accuracy == 0.0
    p = next(p for p in prompts if p.asks_for == "image")
    assert answer_of(p, [{"text": "more words", "image": None}]) is None
    assert answer_of(p, []) is None


def test_text_names_reads_the_first_sentence_against_the_previous_scene(truth):
    prompts, _ = truth
    p = next(p for p in prompts if p.asks_for == "text" and p.kind == "change")
    assert text_names(p.reference + " then something else.", p)
    assert not text_names("the large red circle dances.", p)
    # a full description of the same objects is as right as the change sentence
    described = "that was " + " and ".join(
        f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in p.expected
    )
    assert text_names(described, p)


def test_a_score_with_no_prompts_of_its_kind_is_nan(truth):
    prompts, answers = truth
    images = [(p, a) for p, a in zip(prompts, answers, strict=True) if p.asks_for == "image"]
    scores = story_scores([p for p, _ in images], [a for _, a in images])
    assert scores.text.n == 0 and math.isnan(scores.text.accuracy)
    assert "| text faithfulness | - |" in scores.markdown()
    with pytest.raises(ValueError, match="2 answers"):
        story_scores(prompts[:1], answers[:2])
