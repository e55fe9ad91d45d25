"""Shapes stories: documents of 2-4 shapes scenes, each with one sentence, and exact ground truth.

A story is a sequence of scenes drawn exactly as the shapes dataset draws them (same image size,
colours, shapes, sizes, 3x3 grid, `shapes.render`), on one background. Each scene has one sentence,
either before its image (it asks for the image) or after it (it says what the image showed). The
first scene's sentence is a description; a later scene's is a description or, more often, a change:
the scene is the previous one with exactly one change. The grammar (every sentence ends with "."):

    description, before    "a large red circle at the top left."          (`shapes.caption`)
    description, after     "that was a large red circle at the top left."
    change, before         "then the large red circle moves to the bottom right."
    change, after          "the large red circle moved to the bottom right."

Changes (present / past tense), objects named by size, colour and shape, unique within a scene:

    move        the <object> moves to the <position>     / moved to the <position>
    recolour    the <object> turns <color>               / turned <color>
    reshape     the <object> becomes a <shape>           / became a <shape>
    resize      the <object> grows | shrinks             / grew | shrank  (small <-> large)
    add         a <size> <color> <shape> appears at the <position> / appeared at the <position>
    remove      the <object> disappears                  / disappeared

`scene_from_text(sentence, previous)` inverts the grammar: the objects the sentence says its scene
shows, given the previous scene's objects; it is the one exact check of any sentence (the story
checker scores generated text with it).

Documents: the `segments` column (`STORY_FEATURES`) is the in-memory document contract shared with
the document pipeline: a list of {"text": str | None, "image": PIL image | None}, in order, exactly
one of the two set per segment; a scene's sentence is its own segment (a sentence after an image and
the next scene's sentence before its image are two text segments in a row). The `story` column is
the ground truth as JSON (`Story.to_json`): per scene its objects, its image's and its sentence's
segment index, the sentence's kind and position, and the change.

Splits, as shapes: a story is "test" when its first scene's caption is a held-out shapes caption
(`shapes.split_of`), so no test story (and no test story's opening scene) is in train. Each story
depends only on (seed, split, index), redrawn from its own seed stream until it belongs to its split.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from vqgpt.config import ConfigError
from vqgpt.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    ShapesConfig,
    ShapesError,
    alternation,
    caption,
    parse_caption,
    render,
    sample_scene,
    split_index,
    split_of,
)

CHANGES: tuple[str, ...] = ("move", "recolor", "reshape", "resize", "add", "remove")
KINDS: tuple[str, ...] = ("description", "change")  # what a scene's sentence is
WHERE: tuple[str, ...] = ("before", "after")  # where it sits with respect to its image
AFTER_PREFIX = "that was "  # a description after its image
THEN_PREFIX = "then "  # a change before its image
STREAM = 14  # appended to (seed, split, index): stories never share a draw with shapes images
# what the builder writes, in pretokenized documents' identity (1: sentences in a row glued, 2: " ")
STORIES_VERSION = 2


def story_features():  # -> datasets.Features
    """The columns of a stories dataset (`STORY_FEATURES`): segments, the document, as a list of
    {"text", "image"} structs with exactly one set per segment; story, the ground truth JSON."""
    import datasets  # heavy: only when a dataset is built

    return datasets.Features(
        {
            "segments": datasets.List(
                {"text": datasets.Value("string"), "image": datasets.Image()}
            ),
            "story": datasets.Value("string"),
        }
    )


def __getattr__(name: str):
    # STORY_FEATURES reads as a constant but imports datasets only when first used
    if name == "STORY_FEATURES":
        return story_features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StoriesError(ShapesError):
    """A sentence that the stories grammar cannot read or that does not apply to its scene."""


@dataclass
class StoriesConfig:
    """How many shapes stories to write, how long, and from which seed."""

    num_stories: int = 10000  # train split
    num_test_stories: int = 200  # test split
    min_scenes: int = 2
    max_scenes: int = 4
    image_size: int = 64  # as shapes.image_size
    max_objects: int = 2  # per scene, as shapes.max_objects
    text_before_fraction: float = 0.5  # per scene: its sentence before its image, else after
    change_fraction: float = 0.75  # per scene after the first: a change, else a description
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_stories < 1 or self.num_test_stories < 1:
            raise ConfigError("stories.num_stories and stories.num_test_stories must be >= 1")
        if not 1 <= self.min_scenes <= self.max_scenes:
            raise ConfigError(
                f"stories.min_scenes={self.min_scenes}, max_scenes={self.max_scenes}: "
                "need 1 <= min_scenes <= max_scenes"
            )
        for name in ("text_before_fraction", "change_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"stories.{name}={getattr(self, name)} must be in [0, 1]")
        # the shapes checks of image_size, max_objects and seed, with stories' key names
        try:
            self.shapes()
        except ConfigError as err:
            raise ConfigError(str(err).replace("shapes.", "stories.")) from None

    def shapes(self) -> ShapesConfig:
        """The shapes config that draws this story's scenes."""
        return ShapesConfig(
            image_size=self.image_size, max_objects=self.max_objects, seed=self.seed
        )


# ---------------------------------------------------------------------------------------------
# changes and sentences


@dataclass
class Change:
    """One change from a scene to the next. `target` is the object changed (for add: the new
    one) as it was; `value` is the new position, colour or shape (move, recolor, reshape)."""

    kind: str
    target: ShapeObject
    value: str | None = None


def _name(obj: ShapeObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


# (present, past) of each change's verb phrase, formatted with `value`
_VERBS: dict[str, tuple[str, str]] = {
    "move": ("moves to the {value}", "moved to the {value}"),
    "recolor": ("turns {value}", "turned {value}"),
    "reshape": ("becomes a {value}", "became a {value}"),
    "remove": ("disappears", "disappeared"),
    "add": ("appears at the {value}", "appeared at the {value}"),
}
_RESIZE = {"small": ("grows", "grew"), "large": ("shrinks", "shrank")}  # by the size it had


def change_sentence(change: Change, where: str) -> str:
    """The sentence of a change: before its image 'then ... moves ...', after it '... moved ...'."""
    tense = WHERE.index(where)
    if change.kind == "resize":
        verb = _RESIZE[change.target.size][tense]
    else:
        value = change.target.position if change.kind == "add" else change.value
        verb = _VERBS[change.kind][tense].format(value=value)
    subject = ("a " if change.kind == "add" else "the ") + _name(change.target)
    return (THEN_PREFIX if where == "before" else "") + f"{subject} {verb}."


def description_sentence(objects: list[ShapeObject], where: str) -> str:
    """The sentence of a description: the shapes caption, after its image 'that was ...'."""
    text = caption(ShapeScene(objects, "black")) + "."
    return AFTER_PREFIX + text if where == "after" else text


_OBJ = (
    rf"(?P<size>{alternation(SIZES)}) (?P<color>{alternation(COLORS)}) "
    rf"(?P<shape>{alternation(SHAPES)})"
)
_POS = rf"(?P<value>{alternation(POSITIONS)})"
_CHANGE_RES: dict[str, re.Pattern] = {
    "move": re.compile(rf"the {_OBJ} (?:moves|moved) to the {_POS}"),
    "recolor": re.compile(rf"the {_OBJ} (?:turns|turned) (?P<value>{alternation(COLORS)})"),
    "reshape": re.compile(rf"the {_OBJ} (?:becomes|became) a (?P<value>{alternation(SHAPES)})"),
    "resize": re.compile(rf"the {_OBJ} (?P<value>grows|grew|shrinks|shrank)"),
    "add": re.compile(rf"a {_OBJ} (?:appears|appeared) at the {_POS}"),
    "remove": re.compile(rf"the {_OBJ} (?:disappears|disappeared)"),
}


def first_sentence(text: str) -> str:
    """The first sentence of `text`: normalised (lower case, single spaces), up to its first '.'."""
    norm = " ".join(text.lower().split())
    return norm.split(".", 1)[0].strip()


def _find(previous: list[ShapeObject], size: str, color: str, shape: str) -> ShapeObject:
    found = [o for o in previous if (o.size, o.color, o.shape) == (size, color, shape)]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise StoriesError(f"the previous scene has {what} {size} {color} {shape}")
    return found[0]


def parse_change(text: str, previous: list[ShapeObject]) -> Change:
    """The change a change sentence names, resolved against the previous scene's objects."""
    sentence = first_sentence(text).removeprefix(THEN_PREFIX)
    for kind, pattern in _CHANGE_RES.items():
        match = pattern.fullmatch(sentence)
        if match is None:
            continue
        size, color, shape = match["size"], match["color"], match["shape"]
        if kind == "add":
            return Change(kind, ShapeObject(color, shape, size, match["value"]))
        target = _find(previous, size, color, shape)
        if kind == "resize":
            grows = match["value"] in ("grows", "grew")
            if grows != (target.size == "small"):
                raise StoriesError(f"a {size} object cannot {match['value'].rstrip('s')}")
            return Change(kind, target)
        value = match["value"] if kind != "remove" else None
        return Change(kind, target, value)
    raise StoriesError(f"{text!r} is not a change sentence of the stories grammar")


def apply_change(previous: list[ShapeObject], change: Change) -> list[ShapeObject]:
    """The scene after `change` (row-major order); StoriesError when it cannot apply."""
    others = [o for o in previous if o != change.target]
    occupied = {o.position for o in others}
    t = change.target
    if change.kind == "add":
        if t.position in {o.position for o in previous}:
            raise StoriesError(f"cannot add an object at the {t.position}: it is taken")
        new = [*previous, t]
    elif change.target not in previous:
        raise StoriesError(f"the previous scene has no {_name(t)} at the {t.position}")
    elif change.kind == "remove":
        new = others
    elif change.kind == "move":
        if change.value == t.position or change.value in occupied:
            raise StoriesError(f"cannot move the {_name(t)} to the {change.value}")
        new = [*others, ShapeObject(t.color, t.shape, t.size, change.value)]
    elif change.kind == "recolor":
        if change.value == t.color:
            raise StoriesError(f"the {_name(t)} is already {t.color}")
        new = [*others, ShapeObject(change.value, t.shape, t.size, t.position)]
    elif change.kind == "reshape":
        if change.value == t.shape:
            raise StoriesError(f"the {_name(t)} is already a {t.shape}")
        new = [*others, ShapeObject(t.color, change.value, t.size, t.position)]
    elif change.kind == "resize":
        size = "large" if t.size == "small" else "small"
        new = [*others, ShapeObject(t.color, t.shape, size, t.position)]
    else:
        raise StoriesError(f"unknown change {change.kind!r}; known: {', '.join(CHANGES)}")
    return sorted(new, key=lambda o: POSITIONS.index(o.position))


def scene_from_text(text: str, previous: list[ShapeObject] | None) -> list[ShapeObject]:
    """The objects that a scene's sentence says the scene shows (its first sentence is read:
    a description, or a change applied to `previous`); StoriesError when it cannot be read."""
    sentence = first_sentence(text)
    if not sentence:
        raise StoriesError("an empty sentence names no scene")
    try:
        return parse_caption(sentence.removeprefix(AFTER_PREFIX))
    except ShapesError as err:
        if previous is None:  # the first scene: only a description can name it
            raise StoriesError(str(err)) from None
    return apply_change(previous, parse_change(sentence, previous))


# ---------------------------------------------------------------------------------------------
# stories


@dataclass
class Scene:
    """One scene's ground truth: its objects and where its image and sentence sit."""

    objects: list[ShapeObject]
    image_segment: int
    text_segment: int
    kind: str  # "description" | "change"
    where: str  # "before" | "after" its image
    text: str
    change: Change | None = None


@dataclass
class Story:
    """A story's ground truth (the `story` column, as JSON)."""

    background: str
    scenes: list[Scene] = field(default_factory=list)

    def to_json(self) -> str:
        """This story as a JSON string."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Story:
        """Inverse of `to_json`."""
        data = json.loads(text)

        def scene(d: dict[str, Any]) -> Scene:
            change = d.pop("change")
            if change is not None:
                change = Change(change["kind"], ShapeObject(**change["target"]), change["value"])
            return Scene(objects=[ShapeObject(**o) for o in d.pop("objects")], change=change, **d)

        return cls(data["background"], [scene(d) for d in data["scenes"]])


class StoryExample(NamedTuple):
    segments: list[dict]  # {"text": str | None, "image": PIL image | None}
    story: Story


def _unique(objects: list[ShapeObject]) -> bool:
    """No two objects share size, colour and shape: every change sentence names one object."""
    names = [_name(o) for o in objects]
    return len(set(names)) == len(names)


def _pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def _sample_change(
    rng: np.random.Generator, objects: list[ShapeObject], max_objects: int
) -> Change:
    """A random change that applies to `objects` and keeps 1..max_objects unique objects."""
    free = [p for p in POSITIONS if p not in {o.position for o in objects}]
    while True:
        kind = _pick(rng, CHANGES)
        full = len(objects) >= max_objects
        if (
            kind == "add"
            and full
            or kind == "remove"
            and len(objects) < 2
            or not free
            and kind == "move"
        ):
            continue
        if kind == "add":
            new = ShapeObject(
                _pick(rng, list(COLORS)), _pick(rng, SHAPES), _pick(rng, list(SIZES)), ""
            )
            change = Change(kind, ShapeObject(new.color, new.shape, new.size, _pick(rng, free)))
        else:
            target = _pick(rng, objects)
            value = None
            if kind == "move":
                value = _pick(rng, free)
            elif kind == "recolor":
                value = _pick(rng, [c for c in COLORS if c != target.color])
            elif kind == "reshape":
                value = _pick(rng, [s for s in SHAPES if s != target.shape])
            change = Change(kind, target, value)
        if _unique(apply_change(objects, change)):
            return change


def _sample_story(rng: np.random.Generator, cfg: StoriesConfig) -> Story:
    """A random story's ground truth (no images yet)."""
    shapes_cfg = cfg.shapes()
    first = sample_scene(rng, shapes_cfg)
    while not _unique(first.objects):
        first = sample_scene(rng, shapes_cfg)
    story = Story(first.background)
    objects = first.objects
    segment = 0
    for i in range(int(rng.integers(cfg.min_scenes, cfg.max_scenes + 1))):
        change = None
        if i > 0 and rng.random() < cfg.change_fraction:
            change = _sample_change(rng, objects, cfg.max_objects)
            objects = apply_change(objects, change)
        elif i > 0:  # a description of a scene one change away, so the story stays one story
            objects = apply_change(objects, _sample_change(rng, objects, cfg.max_objects))
        where = "before" if rng.random() < cfg.text_before_fraction else "after"
        text = (
            change_sentence(change, where)
            if change is not None
            else description_sentence(objects, where)
        )
        before = where == "before"
        story.scenes.append(
            Scene(
                objects=objects,
                image_segment=segment + 1 if before else segment,
                text_segment=segment if before else segment + 1,
                kind="change" if change is not None else "description",
                where=where,
                text=text,
                change=change,
            )
        )
        segment += 2
    return story


def draw_story(story: Story, image_size: int) -> list[dict]:
    """The story's segments: each scene's sentence and image (`shapes.render`), in order. A
    sentence right after another sentence starts with a space (" then the ..."): text segments
    are encoded one by one, so without it the two would read "... left.then ..."; a sentence at
    the start or after an image has none, as a caption after its image."""
    segments: list[dict] = [{}] * (2 * len(story.scenes))
    for scene in story.scenes:
        image = render(ShapeScene(scene.objects, story.background), image_size)
        segments[scene.image_segment] = {"text": None, "image": image}
        segments[scene.text_segment] = {"text": scene.text, "image": None}
    for i in range(1, len(segments)):
        if segments[i]["text"] is not None and segments[i - 1]["text"] is not None:
            segments[i] = {"text": " " + segments[i]["text"], "image": None}
    return segments


def make_story(cfg: StoriesConfig, index: int, split: str = "train") -> StoryExample:
    """Story `index` of `split`: depends only on (cfg.seed, split, index)."""
    rng = np.random.default_rng([cfg.seed, split_index(split), index, STREAM])
    while True:  # redraw until the first scene's caption belongs to this split
        story = _sample_story(rng, cfg)
        if split_of(caption(ShapeScene(story.scenes[0].objects, story.background))) == split:
            return StoryExample(draw_story(story, cfg.image_size), story)


def stories_dataset(cfg: StoriesConfig, split: str = "train"):  # -> datasets.Dataset
    """The stories split as a datasets.Dataset: segments (the document) and story (JSON)."""
    import datasets

    n = cfg.num_stories if split_index(split) == 0 else cfg.num_test_stories
    examples = [make_story(cfg, i, split) for i in range(n)]
    return datasets.Dataset.from_dict(
        {
            "segments": [e.segments for e in examples],
            "story": [e.story.to_json() for e in examples],
        },
        features=story_features(),
    )


# ---------------------------------------------------------------------------------------------
# held-out prompts


class StoryPrompt(NamedTuple):
    """A story cut where the model should write the next image ("image": the prompt ends with the
    sentence that asks for it) or the next sentence ("text": it ends with the image to describe)."""

    story: int  # index in the split
    scene: int  # the scene asked for
    asks_for: str  # "image" | "text"
    kind: str  # the true sentence's kind: "description" | "change"
    segments: list[dict]  # the document so far, as in the segments column
    expected: list[ShapeObject]  # the objects of the scene asked for
    previous: list[ShapeObject] | None  # the previous scene's objects (None for the first)
    reference: str  # the true sentence of that scene


def story_prompts(example: StoryExample, index: int) -> list[StoryPrompt]:
    """Every prompt of one story: one per scene, cut before its image (sentence before it) or
    right after its image (sentence after it)."""
    prompts = []
    for i, scene in enumerate(example.story.scenes):
        before = scene.where == "before"
        cut = scene.image_segment if before else scene.image_segment + 1
        previous = example.story.scenes[i - 1].objects if i else None
        prompts.append(
            StoryPrompt(
                story=index,
                scene=i,
                asks_for="image" if before else "text",
                kind=scene.kind,
                segments=example.segments[:cut],
                expected=scene.objects,
                previous=previous,
                reference=scene.text,
            )
        )
    return prompts


def stories_prompts(cfg: StoriesConfig, split: str = "test") -> list[StoryPrompt]:
    """Held-out prompts: every scene of every story of `split` (num_test_stories for "test")."""
    n = cfg.num_stories if split_index(split) == 0 else cfg.num_test_stories
    return [p for i in range(n) for p in story_prompts(make_story(cfg, i, split), i)]


def segment_kind(segment: dict) -> str:
    """'text' or 'image'; ValueError unless exactly one of the two is set."""
    has_text, has_image = segment.get("text") is not None, segment.get("image") is not None
    if has_text == has_image:
        raise ValueError(f"a segment holds exactly one of text and image, got {segment!r}")
    return "text" if has_text else "image"


__all__ = [
    "CHANGES",
    "KINDS",
    "WHERE",
    "Change",
    "Scene",
    "StoriesConfig",
    "StoriesError",
    "Story",
    "StoryExample",
    "StoryPrompt",
    "apply_change",
    "change_sentence",
    "description_sentence",
    "draw_story",
    "first_sentence",
    "make_story",
    "parse_change",
    "scene_from_text",
    "segment_kind",
    "stories_dataset",
    "stories_prompts",
    "story_features",
    "story_prompts",
]
