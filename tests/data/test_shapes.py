"""The built-in shapes dataset: determinism, captions, geometry, splits, image folder export."""

import json

import numpy as np
import pytest

from vqgpt.config import ConfigError, from_dict
from vqgpt.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    ShapesConfig,
    caption,
    cell_box,
    make_example,
    object_box,
    parse_caption,
    render,
    sample_scene,
    shapes_dataset,
    split_of,
    write_image_folder,
)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_config_validation():
    assert from_dict(ShapesConfig, {"max_objects": 3}).max_objects == 3
    with pytest.raises(ConfigError, match="max_objects"):
        ShapesConfig(max_objects=0)
    with pytest.raises(ConfigError, match="max_objects"):
        ShapesConfig(max_objects=10)
    with pytest.raises(ConfigError, match="image_size"):
        ShapesConfig(image_size=8)
    with pytest.raises(ConfigError, match="num_images"):
        ShapesConfig(num_images=0)


def test_vocab_is_distinct():
    # colours are far from each other and from every background (RGB distance)
    def far(a, b):
        return np.linalg.norm(np.subtract(a, b)) > 100

    colors = list(COLORS.values())
    for bg in BACKGROUNDS.values():
        assert all(far(bg, rgb) for rgb in colors)
    assert all(far(a, b) for i, a in enumerate(colors) for b in colors[i + 1 :])


def test_same_seed_and_index_same_image():
    cfg = ShapesConfig(seed=3)
    a, b = make_example(cfg, 17), make_example(cfg, 17)
    assert a.text == b.text
    assert np.array_equal(pixels(a.image), pixels(b.image))
    # independent of how many are generated
    small = shapes_dataset(ShapesConfig(num_images=3, seed=3))
    big = shapes_dataset(ShapesConfig(num_images=8, seed=3))
    assert small["text"] == big["text"][:3]
    assert np.array_equal(pixels(small[2]["image"]), pixels(big[2]["image"]))
    # a different index or seed gives different images
    assert not np.array_equal(pixels(a.image), pixels(make_example(cfg, 18).image))
    other = make_example(ShapesConfig(seed=4), 17)
    assert not np.array_equal(pixels(a.image), pixels(other.image))


def test_caption_round_trip_many_scenes():
    cfg = ShapesConfig(max_objects=4)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(500):
        scene = sample_scene(rng, cfg)
        text = caption(scene)
        assert parse_caption(text) == scene.objects
        seen.add(text)
    assert len(seen) > 450  # scenes are varied
    # all vocabulary appears
    joined = " ".join(seen)
    for word in [*COLORS, *SHAPES, *SIZES]:
        assert f" {word} " in joined


def test_caption_sorts_objects_by_position():
    a = ShapeObject("red", "circle", "large", "bottom right")
    b = ShapeObject("blue", "square", "small", "top left")
    text = caption(ShapeScene([a, b], "gray"))
    assert text == "a small blue square at the top left and a large red circle at the bottom right"
    assert parse_caption(text) == [b, a]
    assert parse_caption("  A small blue square at the  top left.") == [b]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle at the top",  # no size
        "a huge red circle at the top",
        "a large red circle at the middle",
        "a large red circle at the top and",
        "a large red circle at the top and a small blue square at the top",  # same cell twice
        "<|img_00001|>",
    ],
)
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_cells_tile_the_image_and_objects_fit():
    size = 64
    covered = np.zeros((size, size), dtype=int)
    for pos in POSITIONS:
        box = cell_box(pos, size)
        covered[box.top : box.bottom, box.left : box.right] += 1
        for shape_size in SIZES:
            ob = object_box(ShapeObject("red", "circle", shape_size, pos), size)
            assert box.left < ob.left < ob.right < box.right
            assert box.top < ob.top < ob.bottom < box.bottom
    assert (covered == 1).all()
    assert cell_box("center", size) == (21, 21, 43, 43)


@pytest.mark.parametrize("image_size", [64, 48])
def test_objects_drawn_in_their_cells(image_size):
    cfg = ShapesConfig(image_size=image_size, max_objects=3)
    for index in range(100):
        ex = make_example(cfg, index)
        px = pixels(ex.image)
        assert px.shape == (image_size, image_size, 3)
        outside = np.ones((image_size, image_size), dtype=bool)
        for obj in ex.scene.objects:
            ob = object_box(obj, image_size)
            cx, cy = int((ob.left + ob.right) / 2), int((ob.top + ob.bottom) / 2)
            assert tuple(px[cy, cx]) == COLORS[obj.color], (ex.text, obj)
            outside[int(ob.top) : int(ob.bottom) + 1, int(ob.left) : int(ob.right) + 1] = False
        # everything outside the object boxes is exactly the background
        assert (px[outside] == BACKGROUNDS[ex.scene.background]).all()


def test_shape_areas_match_their_geometry():
    # share of the bounding box covered: tells circle, square and triangle apart
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
    for shape, share in expected.items():
        obj = ShapeObject("yellow", shape, "large", "center")
        px = pixels(render(ShapeScene([obj], "black"), 64)).astype(float)
        # antialiased coverage: blend weight of yellow over black, per pixel
        weight = (px - BACKGROUNDS["black"]) / np.subtract(COLORS["yellow"], BACKGROUNDS["black"])
        ob = object_box(obj, 64)
        area = (ob.right - ob.left) * (ob.bottom - ob.top)
        assert weight.mean(-1).sum() / area == pytest.approx(share, rel=0.1), shape


def test_splits_are_disjoint():
    cfg = ShapesConfig(num_images=2000, num_test_images=200, max_objects=2)
    train = {make_example(cfg, i, "train").text for i in range(cfg.num_images)}
    test = [make_example(cfg, i, "test").text for i in range(cfg.num_test_images)]
    assert not train & set(test)
    assert all(split_of(t) == "test" for t in test)
    assert len(set(test)) > 100  # not a handful of repeated scenes
    with pytest.raises(ValueError, match="split"):
        make_example(cfg, 0, "validation")


def test_dataset_columns():
    ds = shapes_dataset(ShapesConfig(num_images=5, num_test_images=4), "test")
    assert len(ds) == 4
    assert set(ds.column_names) == {"image", "text", "objects"}
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    objects = [ShapeObject(**o) for o in json.loads(row["objects"])]
    assert objects == parse_caption(row["text"])


def test_write_image_folder(tmp_path):
    ds = shapes_dataset(ShapesConfig(num_images=6))
    out = write_image_folder(ds, tmp_path / "shapes")
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == ds["text"]
    assert [x["objects"] for x in lines] == ds["objects"]
    assert all((out / x["file_name"]).is_file() for x in lines)
    # complete: a second call does no work
    png = out / lines[0]["file_name"]
    before = png.stat().st_mtime_ns
    png.write_bytes(b"sentinel")
    write_image_folder(ds, out)
    assert png.read_bytes() == b"sentinel"
    # a different dataset into the same folder is written again
    ds2 = shapes_dataset(ShapesConfig(num_images=6, seed=1))
    write_image_folder(ds2, out)
    assert png.read_bytes() != b"sentinel" and png.stat().st_mtime_ns >= before
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == ds2["text"]
