"""vqgpt.data.images: why an image could not be read, input lists, output names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vqgpt.data.images import (
    ImageInputError,
    OutputExistsError,
    list_images,
    max_image_pixels,
    output_names,
    read_image,
    refuse_existing,
)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


NOISE = _png(Image.effect_noise((64, 64), 40))


@pytest.mark.parametrize(
    "src, reason",
    [
        (b"", "empty"),
        ({"bytes": b"", "path": None}, "empty"),
        (b"not an image at all", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n not really", "not_an_image"),
        (NOISE[:300], "truncated"),
        (_png(Image.new("RGB", (300, 300)), "JPEG")[:1500], "truncated"),
        ("/no/such/file.png", "missing"),
        ({"bytes": None, "path": None}, "missing"),
        (_png(Image.new("1", (20000, 10000))), "too_large"),  # valid, over PIL's limit
    ],
)
def test_each_failure_has_its_reason(src, reason):
    image, skip = read_image(src)
    assert image is None and skip.reason == reason, skip


def test_too_large_names_the_limit_and_the_knob(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (20000, 10000), 3).save(path)
    skip = read_image(path).skip
    assert skip.reason == "too_large"
    assert "20000x10000 = 200,000,000 pixels, over the limit of 89,478,485" in skip.detail
    assert "VQGPT_MAX_IMAGE_PIXELS" in skip.detail
    small = _png(Image.new("RGB", (10, 10)))
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "99")
    assert max_image_pixels() == 99 and read_image(small).skip.reason == "too_large"
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "100")
    assert read_image(small).image.size == (10, 10)
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "0")  # no limit: the header check is off
    assert max_image_pixels() is None
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "-5")
    with pytest.raises(ImageInputError, match="whole number"):
        max_image_pixels()


def test_output_names_are_unique_and_predictable():
    files = [Path("a/twin.png"), Path("a/twin.bmp"), Path("b/twin.png"), Path("c/twin.png")]
    assert output_names(files, "_recon.png") == [
        "twin.png_recon.png",
        "twin.bmp_recon.png",
        "twin.png_recon-2.png",
        "twin.png_recon-3.png",
    ]
    tricky = [Path("x.png"), Path("y/x.png"), Path("x.png_recon-2")]  # cannot collide either
    names = output_names(tricky, "_recon.png")
    assert len(set(names)) == 3


def test_list_images_lists_each_file_once_and_refuses_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "one.png")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    one = tmp_path / "a" / "one.png"
    listed = list_images([tmp_path / "a", one, tmp_path / "empty"])
    assert listed.files == [one] and listed.repeated == [one]
    with pytest.raises(ImageInputError, match="no image files in"):
        list_images([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_images([tmp_path / "gone.png"])


def test_refuse_existing_names_the_file(tmp_path):
    refuse_existing(tmp_path / "new", ["a.png"])  # a folder that does not exist yet: fine
    (tmp_path / "b.png").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="b.png already exists"):
        refuse_existing(tmp_path, ["a.png", "b.png"])
