"""Shapes stories: config, determinism, splits, segments, ground truth against the drawn images,
and every sentence of the grammar read back exactly."""

import json

import numpy as np
import pytest

from vqgpt.config import ConfigError, from_dict
from vqgpt.data.shapes import ShapeObject, ShapeScene, caption, render, split_of
from vqgpt.data.stories import (
    CHANGES,
    Change,
    StoriesConfig,
    StoriesError,
    Story,
    apply_change,
    change_sentence,
    description_sentence,
    make_story,
    scene_from_text,
    segment_kind,
    stories_dataset,
    stories_prompts,
)
from vqgpt.eval.shape_checker import read_objects, same_objects

CFG = StoriesConfig(num_stories=12, num_test_stories=6)
RED = ShapeObject("red", "circle", "large", "top left")
BLUE = ShapeObject("blue", "square", "small", "bottom right")


def test_config_validation():
    assert from_dict(StoriesConfig, {"max_scenes": 3}).max_scenes == 3
    for bad, key in [
        ({"min_scenes": 0}, "min_scenes"),
        ({"min_scenes": 3, "max_scenes": 2}, "min_scenes"),
        ({"text_before_fraction": 1.5}, "text_before_fraction"),
        ({"change_fraction": -0.1}, "change_fraction"),
        ({"num_test_stories": 0}, "num_test_stories"),
        ({"max_objects": 10}, "stories.max_objects"),
        ({"image_size": 8}, "stories.image_size"),
    ]:
        with pytest.raises(ConfigError, match=key):
            StoriesConfig(**bad)


def _same_example(a, b) -> bool:
    if a.story != b.story or len(a.segments) != len(b.segments):
        return False
    for x, y in zip(a.segments, b.segments, strict=True):
        if x["text"] != y["text"]:
            return False
        if x["image"] is not None and not np.array_equal(np.asarray(x["image"]), y["image"]):
            return False
    return True


def test_a_story_depends_only_on_seed_split_and_index():
    a = make_story(CFG, 5, "train")
    assert _same_example(a, make_story(StoriesConfig(num_stories=999), 5, "train"))
    assert not _same_example(a, make_story(CFG, 6, "train"))
    assert not _same_example(a, make_story(StoriesConfig(seed=1), 5, "train"))


def test_splits_are_disjoint_by_the_first_scene_caption():
    def first_captions(split, n):
        out = []
        for i in range(n):
            story = make_story(CFG, i, split).story
            out.append(caption(ShapeScene(story.scenes[0].objects, story.background)))
        return out

    train, test = first_captions("train", 60), first_captions("test", 20)
    assert all(split_of(c) == "train" for c in train)
    assert all(split_of(c) == "test" for c in test)
    assert not set(train) & set(test)


def test_segments_and_ground_truth_agree_with_the_drawn_images():
    cfg = StoriesConfig(max_objects=3)
    scenes = kinds = 0
    wheres = set()
    for i in range(40):
        example = make_story(cfg, i)
        story = example.story
        assert cfg.min_scenes <= len(story.scenes) <= cfg.max_scenes
        assert len(example.segments) == 2 * len(story.scenes)
        assert all(segment_kind(s) in ("text", "image") for s in example.segments)
        previous = None
        for j, scene in enumerate(story.scenes):
            image = example.segments[scene.image_segment]["image"]
            assert {scene.image_segment, scene.text_segment} == {2 * j, 2 * j + 1}
            assert (scene.text_segment < scene.image_segment) == (scene.where == "before")
            assert image.size == (cfg.image_size, cfg.image_size)
            assert np.array_equal(  # drawn exactly as shapes draws
                np.asarray(image),
                np.asarray(render(ShapeScene(scene.objects, story.background), 64)),
            )
            assert same_objects(read_objects(image), scene.objects)
            text = example.segments[scene.text_segment]["text"]
            after_text = (
                scene.text_segment > 0
                and segment_kind(example.segments[scene.text_segment - 1]) == "text"
            )  # a sentence after a sentence starts with a space, else none
            assert text == (" " if after_text else "") + scene.text
            assert same_objects(scene_from_text(scene.text, previous), scene.objects)
            assert 1 <= len(scene.objects) <= cfg.max_objects
            if j == 0:
                assert scene.kind == "description"
            else:  # one change away from the previous scene, whatever the sentence is
                assert scene.objects != previous
            if scene.change is not None:
                assert scene.objects == apply_change(previous, scene.change)
            scenes += 1
            kinds += scene.kind == "change"
            wheres.add(scene.where)
            previous = scene.objects
        assert Story.from_json(story.to_json()) == story
    assert 0.3 < kinds / scenes < 0.8 and wheres == {"before", "after"}


@pytest.mark.parametrize("max_objects", [1, 9])
def test_one_object_or_a_full_grid_still_make_true_stories(max_objects):
    cfg = StoriesConfig(max_objects=max_objects, min_scenes=4, change_fraction=1.0)
    for i in range(10):
        scenes = make_story(cfg, i).story.scenes
        for previous, scene in zip(scenes, scenes[1:], strict=False):
            assert scene_from_text(scene.text, previous.objects) == scene.objects
            assert 1 <= len(scene.objects) <= max_objects


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    "change",
    [
        Change("move", RED, "center"),
        Change("recolor", RED, "green"),
        Change("reshape", RED, "diamond"),
        Change("resize", RED),
        Change("add", ShapeObject("white", "triangle", "small", "top")),
        Change("remove", RED),
    ],
    ids=CHANGES,
)
def test_every_change_sentence_reads_back_to_its_change(change, where):
    previous = [RED, BLUE]
    sentence = change_sentence(change, where)
    assert sentence.startswith("then ") == (where == "before") and sentence.endswith(".")
    assert scene_from_text(sentence, previous) == apply_change(previous, change)
    assert scene_from_text(sentence.upper() + " and more", previous) == apply_change(
        previous, change
    )  # the first sentence, normalised


def test_changes_do_exactly_what_they_say():
    previous = [RED, BLUE]
    moved = scene_from_text("then the large red circle moves to the center.", previous)
    assert moved == [ShapeObject("red", "circle", "large", "center"), BLUE]
    assert scene_from_text("the small blue square grew.", previous)[1].size == "large"
    assert scene_from_text("then the large red circle turns green.", previous)[0].color == "green"
    assert scene_from_text("the large red circle disappeared.", previous) == [BLUE]
    added = scene_from_text("then a small white triangle appears at the top.", previous)
    assert [o.position for o in added] == ["top left", "top", "bottom right"]


@pytest.mark.parametrize(
    "sentence",
    [
        "then the large green circle moves to the center.",  # no such object
        "then the large red circle moves to the bottom right.",  # cell taken
        "then the large red circle grows.",  # already large
        "then the large red circle turns red.",  # no change
        "then a small white triangle appears at the top left.",  # cell taken
        "then the large red circle dances.",  # not the grammar
        "",
    ],
)
def test_sentences_that_do_not_apply_are_refused(sentence):
    with pytest.raises(StoriesError):
        scene_from_text(sentence, [RED, BLUE])


def test_descriptions_read_back_before_and_after():
    objects = [RED, BLUE]
    for where in ("before", "after"):
        text = description_sentence(objects, where)
        assert text.startswith("that was ") == (where == "after")
        assert scene_from_text(text, None) == objects
    with pytest.raises(StoriesError):
        scene_from_text("then the large red circle grows.", None)  # nothing to change


def test_dataset_columns_and_contract():
    ds = stories_dataset(CFG, "test")
    assert len(ds) == CFG.num_test_stories and ds.column_names == ["segments", "story"]
    row = ds[0]
    story = Story.from_json(row["story"])
    assert json.loads(row["story"])["scenes"][0]["objects"]  # plain JSON
    for scene in story.scenes:
        image = row["segments"][scene.image_segment]["image"]
        assert row["segments"][scene.image_segment]["text"] is None
        assert same_objects(read_objects(image.convert("RGB")), scene.objects)
        assert row["segments"][scene.text_segment] == {"text": scene.text, "image": None}


def test_prompts_end_where_the_model_should_write():
    prompts = stories_prompts(CFG, "test")
    stories = [make_story(CFG, i, "test").story for i in range(CFG.num_test_stories)]
    assert len(prompts) == sum(len(s.scenes) for s in stories)
    assert {p.asks_for for p in prompts} == {"image", "text"}
    for p in prompts:
        scene = stories[p.story].scenes[p.scene]
        assert p.expected == scene.objects and p.reference == scene.text
        assert p.previous == (stories[p.story].scenes[p.scene - 1].objects if p.scene else None)
        last = p.segments[-1]
        if p.asks_for == "image":  # ends with the sentence that asks for the image
            assert last["image"] is None and last["text"].strip() == scene.text
            assert scene.where == "before"
            assert len(p.segments) == scene.image_segment
        else:  # ends with the image to describe
            assert same_objects(read_objects(last["image"]), scene.objects)
            assert len(p.segments) == scene.image_segment + 1
