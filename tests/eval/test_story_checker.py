"""The story checker: 100% on the true images and sentences, low on shuffled ones, and answers of
the wrong kind or none at all count as wrong."""

import functools
import math
from types import SimpleNamespace

import numpy as np
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
    image = {"text": None, "image": answers[prompts.index(p)]}
    assert answer_of(p, [{"text": " \n", "image": None}, image]) is image["image"]


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


@pytest.fixture(scope="module")
def script(load_script):
    """scripts/stories_eval.py as a module."""
    return load_script("stories_eval")


@functools.cache
def _held_out_stories():
    return [make_story(CFG, i, "test") for i in range(CFG.num_test_stories)]


def _oracle(documents):
    """A fake generator that continues each held-out document with its true next segment."""
    out = []
    for segments in documents:
        for story in _held_out_stories():
            head = story.segments[: len(segments)]
            if [s["text"] for s in head] == [s["text"] for s in segments] and _same_images(
                head, segments
            ):
                out.append(story.segments[len(segments) :])
                break
        else:
            raise AssertionError("a prompt that is no held-out story")
    return out


def _same_images(a, b):
    return all(
        (x["image"] is None) == (y["image"] is None)
        and (x["image"] is None or np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])))
        for x, y in zip(a, b, strict=True)
    )


def test_the_script_scores_a_generator_in_batches(script, truth):
    prompts, _ = truth
    calls = []

    def oracle(documents):
        calls.append(len(documents))
        return _oracle(documents)

    scores = script.evaluate_stories(prompts, oracle, batch_size=7)
    assert scores.image.accuracy == scores.text.accuracy == 1.0
    assert sum(calls) == len(prompts) and max(calls) == 7
    silent = script.evaluate_stories(prompts, lambda docs: [[] for _ in docs], batch_size=50)
    assert silent.image.accuracy == silent.text.accuracy == 0.0
    with pytest.raises(ValueError, match="continued 0 of"):
        script.evaluate_stories(prompts, lambda docs: [], batch_size=4)


def test_the_script_prints_one_table_with_caption_and_t2i_scores(script, truth):
    prompts, answers = truth
    pipeline = {
        "caption": {"exact_match": 0.5, "n": 200},
        "t2i": {"cfg=1": {"accuracy": 0.25, "n": 200}, "cfg=1.5": {"accuracy": 0.75, "n": 200}},
    }
    table = script.summary_table(story_scores(prompts, answers), pipeline)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 5
    assert "| stories: image fidelity (objects asked for, found) | 100.0% |" in table
    assert "| captioning: exact match (greedy) | 50.0% | 200 |" in table
    assert "| text-to-image: all objects right (cfg=1.5) | 75.0% | 200 |" in table


def test_the_script_reads_the_stories_of_the_runs_recipe(script, tmp_path):
    (tmp_path / "config.yaml").write_text(
        "data:\n  documents:\n    source: shapes_stories\n    stories: {num_test_stories: 7}\n"
    )
    assert script.run_stories_config(tmp_path) == StoriesConfig(num_test_stories=7)
    (tmp_path / "config.yaml").write_text("data:\n  tokenizer: runs/t\n")
    assert script.run_stories_config(tmp_path) == StoriesConfig()


def test_the_script_adapts_continue_documents_to_segments(script, truth, monkeypatch):
    import vqgpt.lm.infer as infer

    prompts, answers = truth
    image = next(a for a in answers if isinstance(a, Image.Image))
    seen = {}

    def fake(pipe, documents, sampling, max_new_tokens, max_images, unconditional):
        seen.update(documents=documents, max_new_tokens=max_new_tokens, max_images=max_images)
        seen.update(unconditional=unconditional)
        return [
            infer.ContinuedDocument(d, ["that was it.", image], 1, 2, "max_images")
            for d in documents
        ]

    monkeypatch.setattr(infer, "continue_documents", fake)
    pipe = SimpleNamespace(layout=SimpleNamespace(tokens_per_image=64))
    generate = script.document_generator(pipe, None, "previous_image")
    p = next(p for p in prompts if p.asks_for == "text")
    (continuation,) = generate([list(p.segments)])
    assert seen["unconditional"] == "previous_image"  # --cfg-unconditional reaches the branch
    assert continuation == [{"text": "that was it.", "image": None}, {"text": None, "image": image}]
    assert seen["max_images"] == 1 and seen["max_new_tokens"] >= 64 + 2 + 20
    flat = seen["documents"][0]  # the contract's segments as plain text and images, in order
    assert [x if isinstance(x, str) else None for x in flat] == [s["text"] for s in p.segments]
    assert isinstance(flat[-1], Image.Image)
