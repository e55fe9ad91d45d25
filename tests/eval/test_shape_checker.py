"""The shapes checker reads rendered scenes back exactly and stays accurate on degraded renders."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from vqgpt.data.shapes import (
    COLORS,
    POSITIONS,
    ShapeObject,
    ShapeScene,
    ShapesConfig,
    ShapesError,
    cell_box,
    make_example,
    render,
)
from vqgpt.eval.shape_checker import ATTRIBUTES, check, read_objects, t2i_scores

CFG = ShapesConfig()


def _examples(n: int, split: str = "test", cfg: ShapesConfig = CFG):
    return [make_example(cfg, i, split) for i in range(n)]


def _accuracy(images, examples) -> float:
    pairs = zip(images, examples, strict=True)
    return float(np.mean([check(im, e.scene.objects).all_match for im, e in pairs]))


def _blur(image: Image.Image, i: int) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(1))


def _jpeg(image: Image.Image, i: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=30)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _noise(image: Image.Image, i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _offset(image: Image.Image, i: int) -> Image.Image:
    """Everything one pixel right and one down (an object a little off its cell's centre)."""
    pixels = np.asarray(image)
    moved = np.empty_like(pixels)
    moved[:] = pixels[0, 0]  # (3,) background
    moved[1:, 1:] = pixels[:-1, :-1]
    return Image.fromarray(moved)


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def test_agrees_with_ground_truth_on_renders():
    examples = _examples(300)
    detected = [read_objects(e.image) for e in examples]
    agree = np.mean(
        [d == e.scene.objects for d, e in zip(detected, examples, strict=True)]
    )  # also in order
    assert agree >= 0.99, f"checker agrees with ground truth on {agree:.3f} of renders"


@pytest.mark.parametrize("image_size", [32, 96])
def test_agrees_at_other_image_sizes(image_size):
    examples = _examples(60, "train", replace(CFG, image_size=image_size))
    assert _accuracy([e.image for e in examples], examples) >= 0.99


# measured on 1,000 test images: blur 1.000, JPEG q30 0.998, noise 1.000, offset 1.000
@pytest.mark.parametrize(
    "degrade", [_blur, _jpeg, _noise, _offset], ids=["blur1", "jpeg30", "noise8", "offset1"]
)
def test_stays_accurate_on_degraded_renders(degrade):
    examples = _examples(300)
    accuracy = _accuracy([degrade(e.image, i) for i, e in enumerate(examples)], examples)
    assert accuracy >= 0.95, f"{degrade.__name__}: {accuracy:.3f}"


def test_another_scene_is_a_mismatch():
    examples = _examples(101)
    pairs = [(a, b) for a, b in zip(examples[:-1], examples[1:], strict=True) if a.text != b.text]
    results = [check(a.image, b.scene.objects) for a, b in pairs]
    assert not any(r.all_match for r in results)
    assert np.mean([min(r.per_attribute.values()) for r in results]) < 0.5


def test_per_attribute_counts_each_wrong_attribute():
    truth = [
        ShapeObject("red", "circle", "large", "top left"),
        ShapeObject("blue", "square", "small", "bottom right"),
    ]
    image = render(ShapeScene(truth, "gray"), 64)
    assert check(image, truth) == (True, dict.fromkeys(ATTRIBUTES, 1.0), truth)
    for attribute, wrong in [("color", "green"), ("shape", "diamond"), ("size", "small")]:
        expected = [replace(truth[0], **{attribute: wrong}), truth[1]]
        result = check(image, expected)
        assert not result.all_match
        assert result.per_attribute == {a: 0.5 if a == attribute else 1.0 for a in ATTRIBUTES}


def test_missing_and_extra_objects_are_mismatches():
    one = ShapeObject("yellow", "triangle", "large", "center")
    two = ShapeObject("purple", "diamond", "small", "top")
    result = check(render(ShapeScene([one], "black"), 64), [one, two])  # `two` missing
    assert not result.all_match
    assert result.per_attribute == dict.fromkeys(ATTRIBUTES, 0.5)
    result = check(render(ShapeScene([one, two], "black"), 64), [one])  # `two` extra
    assert not result.all_match
    assert result.per_attribute == dict.fromkeys(ATTRIBUTES, 1.0)
    assert result.detected == [two, one]  # row-major order


def test_a_speck_is_ignored_but_a_blob_is_an_object():
    obj = ShapeObject("green", "circle", "large", "left")
    image = render(ShapeScene([obj], "dark gray"), 64)
    box = cell_box("bottom right", 64)
    speck, blob = image.copy(), image.copy()
    ImageDraw.Draw(speck).rectangle(
        [box.left + 9, box.top + 9, box.left + 10, box.top + 10], COLORS["red"]
    )
    ImageDraw.Draw(blob).rectangle(
        [box.left + 7, box.top + 7, box.left + 13, box.top + 13], COLORS["red"]
    )
    assert check(speck, [obj]).all_match
    result = check(blob, [obj])
    assert not result.all_match
    assert [o.position for o in result.detected] == ["left", "bottom right"]
    assert result.detected[1].color == "red"


def test_blank_image_shows_nothing():
    assert read_objects(Image.new("RGB", (64, 64), (55, 55, 55))) == []


def test_tensor_and_array_inputs_read_like_pil():
    for e in _examples(10):
        assert read_objects(_tensor(e.image)) == e.scene.objects
        assert read_objects(np.asarray(e.image)) == e.scene.objects


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="square"):
        read_objects(Image.new("RGB", (64, 32)))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        read_objects(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError):
        read_objects([[0, 0, 0]])
    with pytest.raises(ValueError, match="at least one"):
        check(Image.new("RGB", (64, 64)), [])


def test_t2i_scores():
    examples = _examples(20)
    prompts = [e.text for e in examples]
    images = [e.image for e in examples]
    assert t2i_scores(prompts, images) == (1.0, dict.fromkeys(ATTRIBUTES, 1.0), 20)
    batch = torch.stack([_tensor(im) for im in images])  # (B, 3, H, W)
    assert t2i_scores(prompts, batch).accuracy == 1.0
    shifted = t2i_scores(prompts, images[1:] + images[:1])
    assert shifted.n == 20 and shifted.accuracy < 0.2
    assert all(0 <= v < 0.8 for v in shifted.per_attribute.values())


def test_t2i_scores_micro_averages_over_objects():
    two = [ShapeObject("red", "square", "small", p) for p in ("top", "bottom")]
    one = [ShapeObject("white", "circle", "large", "center")]
    images = [render(ShapeScene(two[:1], "gray"), 64), render(ShapeScene(one, "gray"), 64)]
    prompts = [
        "a small red square at the top and a small red square at the bottom",
        "a large white circle at the center",
    ]
    scores = t2i_scores(prompts, images)
    assert scores.accuracy == 0.5
    assert scores.per_attribute == dict.fromkeys(ATTRIBUTES, 2 / 3)  # 2 of 3 objects drawn


def test_t2i_scores_rejects_bad_prompts_and_lengths():
    image = render(ShapeScene([ShapeObject("red", "circle", "small", POSITIONS[0])], "gray"), 64)
    with pytest.raises(ShapesError, match="prompt 0"):
        t2i_scores(["a dog"], [image])
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        t2i_scores(["a", "b"], [image])
