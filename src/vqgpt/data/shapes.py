"""The built-in captioned dataset: drawn shapes on a 3x3 grid, with exact ground truth.

A scene is one to `max_objects` objects (colour, shape, size) in distinct cells of a 3x3 grid on a
plain gray background. Its caption is fixed by a small grammar, objects in row-major cell order:

    "a large red circle at the top left and a small blue square at the bottom right"

so every scene has exactly one caption and `parse_caption` inverts `caption`. Everything is seeded
per (seed, split, index), so an image never depends on how many others were generated.

Held-out split: a scene belongs to "test" when a hash of its caption falls in the held-out bucket
(`TEST_FRACTION` of all captions), to "train" otherwise, so no test caption (hence no test image)
ever appears in train. Each split samples from its own seed stream and redraws until the scene
belongs to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from vqgpt.config import ConfigError
from vqgpt.errors import VqgptError
from vqgpt.files import read_text, write_text

RGB = tuple[int, int, int]

# Saturated, far apart in RGB, and none of them gray: easy to tell apart after VQ compression.
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# object extent as a fraction of its cell's side
SIZES: dict[str, float] = {"small": 0.5, "large": 0.85}
# row-major over the 3x3 grid; this order is also the order of objects in a caption
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# dark grays: never an object colour
BACKGROUNDS: dict[str, RGB] = {
    "black": (15, 15, 15),
    "dark gray": (55, 55, 55),
    "gray": (95, 95, 95),
}
SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION = 0.1  # share of all captions held out for the test split
SUPERSAMPLE = 4  # draw at 4x and box-downsample: antialiased edges, exact interior colours


class ShapesError(VqgptError, ValueError):
    """Bad shapes config, split or caption."""


@dataclass
class ShapeObject:
    """One drawn object."""

    color: str
    shape: str
    size: str
    position: str


@dataclass
class ShapeScene:
    """Objects in distinct cells (row-major order) on a plain background."""

    objects: list[ShapeObject]
    background: str


class ShapeExample(NamedTuple):
    image: Image.Image  # RGB, image_size x image_size
    text: str  # the caption
    scene: ShapeScene


class Box(NamedTuple):
    """Pixel box; `right` and `bottom` are exclusive for cells."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass
class ShapesConfig:
    """How many shapes images to draw, how big, and from which seed."""

    num_images: int = 10000  # train split
    image_size: int = 64
    max_objects: int = 2
    seed: int = 0
    num_test_images: int = 500  # test split

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.num_test_images < 1:
            raise ConfigError("shapes.num_images and shapes.num_test_images must be at least 1")
        if self.image_size < 16:
            raise ConfigError(
                f"shapes.image_size={self.image_size} is too small to draw a 3x3 grid; use >= 16"
            )
        if not 1 <= self.max_objects <= len(POSITIONS):
            raise ConfigError(f"shapes.max_objects must be in 1..{len(POSITIONS)}")
        if self.seed < 0:
            raise ConfigError("shapes.seed must be >= 0")


# ---------------------------------------------------------------------------------------------
# geometry


def cell_box(position: str, image_size: int) -> Box:
    """The integer pixel box of a grid cell (right/bottom exclusive)."""
    if position not in POSITIONS:
        raise ShapesError(f"unknown position {position!r}; known: {', '.join(POSITIONS)}")
    row, col = divmod(POSITIONS.index(position), 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return Box(edges[col], edges[row], edges[col + 1], edges[row + 1])


def object_box(obj: ShapeObject, image_size: int) -> Box:
    """The (float) bounding box of an object: centred in its cell, side = size x cell side."""
    cell = cell_box(obj.position, image_size)
    cx, cy = (cell.left + cell.right) / 2, (cell.top + cell.bottom) / 2
    half = SIZES[obj.size] * min(cell.right - cell.left, cell.bottom - cell.top) / 2
    return Box(cx - half, cy - half, cx + half, cy + half)


# ---------------------------------------------------------------------------------------------
# captions


def caption(scene: ShapeScene) -> str:
    """The one caption of a scene: objects in row-major cell order joined by ' and '."""
    objects = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))
    return " and ".join(f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in objects)


def alternation(words: tuple[str, ...] | dict[str, object]) -> str:
    """A regex alternation of `words`, longest first (so "top left" wins over "top")."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"a (?P<size>{alternation(SIZES)}) (?P<color>{alternation(COLORS)}) "
    rf"(?P<shape>{alternation(SHAPES)}) at the (?P<position>{alternation(POSITIONS)})"
)


def parse_caption(text: str) -> list[ShapeObject]:
    """Objects of a caption (inverse of `caption`); ValueError when it does not parse."""
    norm = " ".join(text.lower().split()).rstrip(".")
    if not norm:
        raise ShapesError("cannot parse an empty caption")
    objects = []
    for part in norm.split(" and "):
        match = _OBJECT_RE.fullmatch(part)
        if match is None:
            raise ShapesError(
                f"cannot parse {part!r} in caption {text!r}: expected "
                "'a <size> <color> <shape> at the <position>'"
            )
        objects.append(ShapeObject(**match.groupdict()))
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ShapesError(f"caption {text!r} puts two objects at the same position")
    return objects


def objects_to_json(objects: list[ShapeObject]) -> str:
    """Ground truth as a JSON string (the `objects` column)."""
    return json.dumps([asdict(o) for o in objects])


def split_of(text: str) -> str:
    """Which split a caption belongs to ("train" or "test"), by a stable hash."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 1000 < TEST_FRACTION * 1000 else "train"


# ---------------------------------------------------------------------------------------------
# sampling and drawing


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig) -> ShapeScene:
    """A random scene: 1..max_objects objects in distinct cells, a random background."""
    n = int(rng.integers(1, cfg.max_objects + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    colors, sizes = list(COLORS), list(SIZES)
    objects = [
        ShapeObject(
            color=colors[rng.integers(len(colors))],
            shape=SHAPES[rng.integers(len(SHAPES))],
            size=sizes[rng.integers(len(sizes))],
            position=POSITIONS[cell],
        )
        for cell in cells
    ]
    return ShapeScene(objects, background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


def render(scene: ShapeScene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image (antialiased; object interiors are exactly their colour)."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (image_size * s, image_size * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = (v * s for v in object_box(obj, image_size))
        cx, cy = (left + right) / 2, (top + bottom) / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([left, top, right, bottom], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([left, top, right, bottom], fill=fill)
        elif obj.shape == "triangle":  # apex up, base on the bottom edge
            draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
        else:
            raise ShapesError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
    return image.reduce(s)  # box filter: an s x s block average


def split_index(split: str) -> int:
    """The index of a split name in SPLITS (its seed stream); ShapesError for an unknown one."""
    if split not in SPLITS:
        raise ShapesError(f"unknown shapes split {split!r}; known: {', '.join(SPLITS)}")
    return SPLITS.index(split)


def make_example(cfg: ShapesConfig, index: int, split: str = "train") -> ShapeExample:
    """Example `index` of `split`: depends only on (cfg.seed, split, index)."""
    rng = np.random.default_rng([cfg.seed, split_index(split), index])
    while True:  # redraw until the caption belongs to this split (~1.1 tries train, ~10 test)
        scene = sample_scene(rng, cfg)
        text = caption(scene)
        if split_of(text) == split:
            return ShapeExample(render(scene, cfg.image_size), text, scene)


def shapes_dataset(cfg: ShapesConfig, split: str = "train"):  # -> datasets.Dataset
    """The shapes split as a datasets.Dataset with columns image, text, objects (JSON)."""
    import datasets

    n = cfg.num_images if split_index(split) == 0 else cfg.num_test_images
    examples = [make_example(cfg, i, split) for i in range(n)]
    features = datasets.Features(
        image=datasets.Image(), text=datasets.Value("string"), objects=datasets.Value("string")
    )
    return datasets.Dataset.from_dict(
        {
            "image": [e.image for e in examples],
            "text": [e.text for e in examples],
            "objects": [objects_to_json(e.scene.objects) for e in examples],
        },
        features=features,
    )


# ---------------------------------------------------------------------------------------------
# image folder export

MARKER = ".complete"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_text(tmp, text)
    os.replace(tmp, path)


def write_image_folder(ds, out_dir: str | Path) -> Path:
    """Write `ds` (image, text[, objects]) as PNGs + metadata.jsonl; skipped when already done."""
    out = Path(out_dir)
    extra = [c for c in ds.column_names if c not in ("image", "text")]
    meta = ds.select_columns(["text", *extra]).to_list()
    lines = [
        json.dumps({"file_name": f"{i:06d}.png", **row}, sort_keys=True)
        for i, row in enumerate(meta)
    ]
    stamp = json.dumps(
        {"rows": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    )
    marker = out / MARKER
    if marker.is_file() and read_text(marker) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for i, image in enumerate(ds["image"]):
        image.convert("RGB").save(out / f"{i:06d}.png")
    _atomic_write(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    _atomic_write(marker, stamp)  # last: its presence means every file above is complete
    return out


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEST_FRACTION",
    "Box",
    "ShapeExample",
    "ShapeObject",
    "ShapeScene",
    "ShapesConfig",
    "ShapesError",
    "alternation",
    "caption",
    "cell_box",
    "make_example",
    "object_box",
    "objects_to_json",
    "parse_caption",
    "render",
    "sample_scene",
    "shapes_dataset",
    "split_index",
    "split_of",
    "write_image_folder",
]
