"""Data entry point: robust image loading, transforms, sources, the training view."""

import io
import json
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vqgpt.config import ConfigError, from_dict
from vqgpt.data.formats import standardize_columns
from vqgpt.data.images import ImageTransform, load_rgb, to_pil
from vqgpt.data.shapes import ShapesConfig, write_image_folder
from vqgpt.data.sources import (
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    DataConfig,
    DataError,
    ImageTextDataset,
    SkipStats,
    collate,
    find_readable,
    image_text_dataset,
    load_image_dataset,
)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def rgb_noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# config


def test_config_nested_and_validated():
    cfg = from_dict(DataConfig, {"source": "shapes", "shapes": {"max_objects": 1, "seed": 2}})
    assert cfg.shapes == ShapesConfig(max_objects=1, seed=2)
    with pytest.raises(ConfigError, match="shapes.colour"):
        from_dict(DataConfig, {"shapes": {"colour": "red"}})
    with pytest.raises(ConfigError, match="num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match="num_images"):
        DataConfig(num_images=0)
    with pytest.raises(ConfigError, match="image_size"):
        DataConfig(image_size=4)


# ---------------------------------------------------------------------------------------------
# load_rgb


def test_load_rgb_modes():
    # RGBA / LA: composited on white
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(load_rgb(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    la.putpixel((0, 0), (10, 255))
    out = np.asarray(load_rgb(png_bytes(la)))
    assert tuple(out[0, 0]) == (10, 10, 10) and tuple(out[1, 1]) == (255, 255, 255)
    # P with a transparent palette index -> white
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    out = np.asarray(load_rgb(png_bytes(p)))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 255, 255)
    # 16-bit: scaled, not clipped
    i16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    reloaded = Image.open(io.BytesIO(png_bytes(i16)))
    assert reloaded.mode in ("I;16", "I")
    assert np.asarray(load_rgb(reloaded))[0, :, 0].tolist() == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert np.asarray(load_rgb(i32))[0, :, 0].tolist() == [0, 128, 255]
    # float in [0, 1] and arbitrary float ranges
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb(f01))[0, :, 0].tolist() == [0, 128, 255]
    fwide = Image.fromarray(np.array([[-3.0, 0.0, 3.0]], dtype=np.float32))
    assert np.asarray(load_rgb(fwide))[0, :, 0].tolist() == [0, 128, 255]
    # 1-bit, CMYK
    assert np.asarray(load_rgb(Image.new("1", (2, 2), 1))).tolist() == [[[255] * 3] * 2] * 2
    cmyk = load_rgb(png_bytes(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG"))
    r, g, b = np.asarray(cmyk)[1, 1].tolist()
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_load_rgb_sources(tmp_path):
    image = rgb_noise(5, 3)
    path = tmp_path / "x.png"
    image.save(path)
    for src in (path, str(path), path.read_bytes(), {"bytes": None, "path": str(path)}):
        assert np.array_equal(np.asarray(load_rgb(src)), np.asarray(image))
    assert np.array_equal(
        np.asarray(load_rgb({"bytes": path.read_bytes(), "path": "ignored"})), np.asarray(image)
    )


@pytest.mark.parametrize(
    "src",
    [
        b"",
        b"not an image at all",
        png_bytes(rgb_noise(64, 64))[:300],  # truncated
        {"bytes": None, "path": None},
        "/no/such/file.png",
    ],
)
def test_load_rgb_bad_gives_none(src):
    assert load_rgb(src) is None


# ---------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize("size", [(1, 1), (300, 100), (100, 300), (2500, 1700), (64, 64)])
def test_transform_any_size(size):
    x = ImageTransform(64)(rgb_noise(*size))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_transform_round_trip_and_centre_crop():
    image = rgb_noise(64, 64)
    assert np.array_equal(np.asarray(to_pil(ImageTransform(64)(image))), np.asarray(image))
    # wide image: red | green | blue thirds; the centre crop is all green
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, :32, 0] = wide[:, 32:64, 1] = wide[:, 64:, 2] = 255
    out = ImageTransform(32)(Image.fromarray(wide))
    assert torch.equal(out[1], torch.ones(32, 32)) and (out[0] == -1).all()


def test_random_crop_is_a_function_of_its_seed():
    """(seed, epoch, row) decides a crop: not the global RNG, the process, the worker."""
    image = rgb_noise(96, 64)
    t = ImageTransform(64, random_crop=True)
    torch.manual_seed(0)
    a = [t(image, crop_seed=(0, 0, row)) for row in range(8)]
    torch.manual_seed(123)  # the global RNG plays no part
    b = [t(image, crop_seed=(0, 0, row)) for row in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.sum().item() for x in a}) > 1  # rows get different crops
    assert not torch.equal(t(image, crop_seed=(0, 1, 0)), a[0]) or not torch.equal(
        t(image, crop_seed=(0, 2, 0)), a[0]
    )  # and epochs
    assert torch.equal(ImageTransform(64)(image), ImageTransform(64)(image, crop_seed=(5,)))


def test_augmentation_flips_and_rotates_hue_by_seed():
    """hflip / hue_jitter: drawn from the crop seed after the crop (which they leave alone);
    a flip mirrors the crop exactly, a hue rotation keeps grey pixels and moves colours."""
    image = rgb_noise(96, 64)
    plain = ImageTransform(64, random_crop=True)
    flip = ImageTransform(64, random_crop=True, hflip=True)
    seeds = [(0, 0, row) for row in range(16)]
    outs = [(plain(image, crop_seed=s), flip(image, crop_seed=s)) for s in seeds]
    mirrored = [torch.equal(f, p.flip(-1)) for p, f in outs]
    kept = [torch.equal(f, p) for p, f in outs]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))  # the same crop, maybe mirrored
    assert 3 <= sum(mirrored) <= 13  # about half of 16
    assert all(
        torch.equal(flip(image, crop_seed=s), f) for s, (_, f) in zip(seeds, outs, strict=True)
    )

    hue = ImageTransform(32, hue_jitter=0.5)
    grey = rgb_noise(32, 32).convert("L").convert("RGB")
    assert all(torch.equal(hue(grey, (0, 0, r)), ImageTransform(32)(grey)) for r in range(4))
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    rotated = [hue(red, (0, 0, r))[:, 0, 0] for r in range(16)]
    assert len({tuple(x.tolist()) for x in rotated}) > 8  # many hues
    assert all(x.max() - x.min() > 1.0 for x in rotated)  # still saturated: a hue, not a grey
    with pytest.raises(ValueError, match="hue_jitter"):
        ImageTransform(32, hue_jitter=0.7)
    with pytest.raises(ConfigError, match="hue_jitter"):
        DataConfig(hue_jitter=-0.1)


def test_to_pil_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_pil(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# sources


def test_shapes_source_and_cap():
    cfg = DataConfig(num_images=7, shapes=ShapesConfig(num_images=20, num_test_images=5))
    train, test = load_image_dataset(cfg, "train"), load_image_dataset(cfg, "test")
    assert len(train) == 7 and len(test) == 5
    assert {"image", "text"} <= set(train.column_names)
    assert not set(train["text"]) & set(test["text"])


def test_image_folder_round_trip(tmp_path):
    shapes = ShapesConfig(num_images=8, num_test_images=4)
    src = DataConfig(shapes=shapes)
    for split in ("train", "test"):
        write_image_folder(load_image_dataset(src, split), tmp_path / split)
    folder = DataConfig(source=str(tmp_path))
    for split in ("train", "test"):
        original, loaded = load_image_dataset(src, split), load_image_dataset(folder, split)
        assert loaded["text"] == original["text"]
        for a, b in zip(original["image"], loaded["image"], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_folder_without_metadata_or_splits(tmp_path):
    for i in range(3):
        rgb_noise(10 + i, 20, seed=i).save(tmp_path / f"img{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image, not an image extension")
    ds = load_image_dataset(DataConfig(source=str(tmp_path), num_images=2), "train")
    assert len(ds) == 2 and ds["text"] == ["", ""]


def test_folder_metadata_errors(tmp_path):
    rgb_noise(8, 8).save(tmp_path / "a.png")
    lines = [{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    stats = SkipStats()
    ds = load_image_dataset(DataConfig(source=str(tmp_path)), "train", stats)
    assert ds["text"] == ["ok"] and stats.missing == 1 and stats.total == 1
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{oops\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2"):
        load_image_dataset(DataConfig(source=str(tmp_path)), "train")


def test_folder_of_bad_files(tmp_path):
    good = {
        "rgb.png": rgb_noise(80, 70),
        "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        "gray16.png": Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)),
        "tiny.png": Image.new("RGB", (1, 1), (1, 2, 3)),
        "la.png": Image.new("LA", (16, 16), (128, 100)),
    }
    for name, image in good.items():
        image.save(tmp_path / name)
    p = Image.new("P", (10, 10), 0)  # index 0 (black) is transparent
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 5, 10))  # left half red
    p.save(tmp_path / "palette.png", transparency=0)
    full = png_bytes(rgb_noise(64, 64, seed=5))
    bad = {
        "corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
        "truncated.png": full[: len(full) // 2],
        "empty.png": b"",
        "text.png": b"this is a text file pretending to be a PNG\n",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")

    stats = SkipStats()
    ds = load_image_dataset(DataConfig(source=str(tmp_path)), "train", stats)
    # each skip says what was wrong, not just "unreadable"
    assert stats.counts == {"empty": 1, "not_an_image": 2, "truncated": 1}
    assert stats.total == len(bad) and stats.missing == stats.unreadable == 0
    names = {n.split(" (")[0].rsplit("/", 1)[-1]: n for n in stats.examples}
    assert sorted(names) == sorted(bad)
    assert "(empty file" in names["empty.png"] and "(truncated" in names["truncated.png"]
    assert "truncated: 1" in str(stats) and "not an image: 2" in str(stats)
    assert len(ds) == len(good) + 1
    assert "skipped 4 image(s)" in str(stats)

    data = ImageTextDataset(ds, ImageTransform(64))
    assert len(data) == len(ds) and data.stats.total == 0
    batch = collate([data[i] for i in range(len(data))])
    assert batch["pixel_values"].shape == (len(ds), 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["text"] == [""] * len(ds)
    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    px = dict(zip([r["path"].rsplit("/", 1)[-1] for r in raw], batch["pixel_values"], strict=True))
    assert torch.allclose(px["palette.png"][:, 32, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(px["palette.png"][:, 32, 63], torch.ones(3))  # transparent -> white
    assert torch.allclose(px["gray16.png"], torch.full((3, 64, 64), 156 / 127.5 - 1))


def test_training_view_skips_bad_rows():
    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    rows = {
        "image": [
            {"bytes": png_bytes(rgb_noise(8, 8)), "path": None},
            {"bytes": b"garbage", "path": "bad.png"},
            {"bytes": png_bytes(rgb_noise(9, 7)), "path": None},
        ],
        "text": ["first", "broken", "third"],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    readable = find_readable(ds)
    assert readable.indices == [0, 2] and readable.stats.counts == {"not_an_image": 1}
    assert readable.stats.examples == [
        "bad.png (not an image (no image format recognises the data))"
    ]
    data = ImageTextDataset(ds, ImageTransform(16))
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    (batch,) = list(loader)
    assert batch["text"] == ["first", "third"] and batch["pixel_values"].shape == (2, 3, 16, 16)


def test_image_text_dataset_transform_flags():
    cfg = DataConfig(num_images=4, random_crop=True, shapes=ShapesConfig(num_test_images=3))
    train = image_text_dataset(cfg, cfg.train_split, train=True)
    evaluation = image_text_dataset(cfg, cfg.eval_split, train=False)
    assert train.transform.random_crop and not evaluation.transform.random_crop
    assert len(train) == 4 and len(evaluation) == 3
    assert train[0]["pixel_values"].shape == (3, 64, 64)
    cfg = DataConfig(num_images=4, hflip=True, hue_jitter=0.25)
    train = image_text_dataset(cfg, cfg.train_split, train=True)
    evaluation = image_text_dataset(cfg, cfg.eval_split, train=False)
    assert train.transform.hflip and train.transform.hue_jitter == 0.25
    assert not evaluation.transform.hflip and evaluation.transform.hue_jitter == 0.0


def test_photos_source():
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    cfg = DataConfig(source="photos", image_size=32, num_images=len(TRAIN_PHOTOS) + 1)
    train, test = load_image_dataset(cfg, "train"), load_image_dataset(cfg, "test")
    assert len(train) == len(test) == len(TRAIN_PHOTOS) + 1
    assert not set(train["text"]) & set(test["text"])
    assert len(set(test["text"])) == len(TEST_PHOTOS)  # every test photo used
    first = train[0]["image"]
    assert first.mode == "RGB" and first.size == (32, 32)
    again = load_image_dataset(cfg, "train")[0]["image"]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(train[len(TRAIN_PHOTOS)]["image"]))


def test_photos_without_scikit_image(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(DataError, match="pip install scikit-image"):
        load_image_dataset(DataConfig(source="photos"), "train")


def test_hub_source_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="someone/captions.*network"):
        load_image_dataset(DataConfig(source="someone/captions"), "train")
    with pytest.raises(DataError, match="does not exist"):  # a typo'd folder never hits the Hub
        load_image_dataset(DataConfig(source="./no/such/folder"), "train")


def test_standardize_columns():
    ds = datasets.Dataset.from_dict({"img": ["a"], "caption": ["hi"], "extra": [1]})
    out = standardize_columns(ds, "img", "caption")
    # the other columns are kept unchanged (the load_image_dataset contract)
    assert out.column_names == ["image", "text", "extra"] and list(out["text"]) == ["hi"]
    out = standardize_columns(ds, "img", "")
    assert list(out["text"]) == [""] and list(out["extra"]) == [1]
    with pytest.raises(DataError, match="'txt'"):
        standardize_columns(ds, "img", "txt")


def test_training_skip_counts_say_why(monkeypatch):
    # issue 18, fault 8: the training view counts skips per reason, too large included
    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    good = png_bytes(rgb_noise(8, 8))
    rows = {
        "image": [
            {"bytes": good, "path": None},
            {"bytes": b"", "path": "empty.png"},
            {"bytes": good[:60], "path": "cut.png"},
            {"bytes": png_bytes(rgb_noise(20, 20)), "path": "big.png"},
        ],
        "text": ["", "", "", ""],
    }
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "100")  # 8x8 fits, 20x20 does not
    readable = find_readable(datasets.Dataset.from_dict(rows, features=features))
    assert readable.indices == [0]
    assert readable.stats.counts == {"empty": 1, "truncated": 1, "too_large": 1}
    text = str(readable.stats)
    assert "empty file: 1, truncated: 1, too large: 1" in text
    assert "big.png (too large: 20x20 = 400 pixels, over the limit of 100" in text
    assert "VQGPT_MAX_IMAGE_PIXELS" in text


@pytest.mark.parametrize(
    "name, message",
    [
        ("red.png", "cannot tell the format of .*red.png from its suffix"),
        ("notes.txt", "cannot tell the format of .*notes.txt from its suffix"),
        ("archive.tar", "archive.tar is not a tar archive"),
    ],
)
def test_a_file_as_source_is_named_a_file(tmp_path, monkeypatch, name, message):
    """`eval --data ../red.png`: an existing file, not a folder that does not exist."""
    (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "..")
    for source in (str(tmp_path / name), f"./{tmp_path.name}/{name}"):
        with pytest.raises(DataError, match=message):
            load_image_dataset(DataConfig(source=source), "test")
    with pytest.raises(DataError, match="looks like a path, but it does not exist"):
        load_image_dataset(DataConfig(source=str(tmp_path / "gone")), "test")
