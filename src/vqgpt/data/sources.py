"""Datasets in: built-in shapes, scikit-image photos, a local image folder, or a Hub dataset.

Every source ends as a `datasets.Dataset` with an `image` and a `text` column. Images that cannot
be read are skipped and counted per reason in a `SkipStats` (missing, empty, not an image,
truncated, too large, ...: `read_image`), never a crash; odd modes (L, LA, P, RGBA, CMYK, I;16, I,
F, 1) become RGB.

Bad rows and distributed training: `ImageTextDataset` makes one up-front, deterministic pass that
decodes every image and keeps the indices of the good ones. Every rank computes the same list, so
all ranks see the same length and the same number of batches (dropping Nones in `collate` would
give ranks different batch sizes).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgpt.config import ConfigError
from vqgpt.data.images import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    ImageSkip,
    ImageTransform,
    describe_skips,
    load_rgb,
    read_image,
)
from vqgpt.data.shapes import ShapesConfig, shapes_dataset
from vqgpt.errors import VqgptError
from vqgpt.files import FileReadError, read_json_lines

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")

# scikit-image's bundled photographs (skimage/data). Disjoint on purpose: test crops come from
# photos never seen in training. Synthetic images (chessboard, logo, text, ...) and the near-copy
# motorcycle_right are left out.
TRAIN_PHOTOS: dict[str, str] = {
    "astronaut.png": "an astronaut",
    "coffee.png": "a cup of coffee",
    "rocket.jpg": "a rocket on a launch pad",
    "motorcycle_left.png": "a motorcycle",
    "hubble_deep_field.jpg": "galaxies in deep space",
    "camera.png": "a man with a camera",
    "coins.png": "old coins",
    "moon.png": "the surface of the moon",
    "brick.png": "a brick wall",
    "grass.png": "grass",
    "gravel.png": "gravel",
}
TEST_PHOTOS: dict[str, str] = {
    "chelsea.png": "a cat",
    "ihc.png": "stained tissue under a microscope",
    "retina.jpg": "a retina",
    "clock_motion.png": "a clock",
}
MIN_CROP_SCALE = 0.25  # photo crops span 25%..100% of the photo's shorter side
FORMATS = ("auto", "folder", "parquet", "arrow", "webdataset", "hub")  # data.format


class DataError(VqgptError, RuntimeError):
    """A dataset that cannot be found or read."""


@dataclass
class PhotosConfig:
    """Random square crops of scikit-image's photographs."""

    num_images: int = 2000  # crops in the train split
    num_test_images: int = 200  # crops in the test split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.num_test_images < 1:
            raise ConfigError("photos.num_images and photos.num_test_images must be at least 1")
        if self.seed < 0:
            raise ConfigError("photos.seed must be >= 0")


@dataclass
class DataConfig:
    """Where images come from and how they are prepared."""

    # "shapes" | "photos" | a folder | files, globs, brace notation (`s/{00000..00009}.tar`) |
    # a Hub dataset name (data/formats.py)
    source: str = "shapes"
    format: str = "auto"  # auto (from the path) | folder | parquet | arrow | webdataset | hub
    streaming: bool = False  # read as a datasets.IterableDataset: no copy in RAM or on disk
    shuffle_buffer: int = 1000  # streamed training: rows in datasets' shuffle buffer
    image_size: int = 64  # side of the training images (shapes draw at shapes.image_size)
    num_images: int | None = None  # cap on the rows of each split
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    photos: PhotosConfig = field(default_factory=PhotosConfig)
    image_column: str = "image"  # Hub, Parquet, Arrow: renamed to "image"
    text_column: str = "text"  # Hub, Parquet, Arrow: renamed to "text"; "" = no captions
    caption_key: str = "caption"  # WebDataset: the caption's field in key.json (without key.txt)
    train_split: str = "train"
    eval_split: str = "test"
    random_crop: bool = False  # train transform: random instead of centre crop
    # tokenizer training augmentation (the LM's pretokenised data never sees it: a caption may
    # name a side or a colour): flip left-right with probability 1/2; rotate the hue uniformly
    # within +-hue_jitter turns (0 = off, 0.5 = any hue)
    hflip: bool = False
    hue_jitter: float = 0.0
    num_workers: int = 0  # DataLoader workers

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("data.source must be 'shapes', 'photos', a folder or a Hub name")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size} must be at least 8")
        if self.num_images is not None and self.num_images < 1:
            raise ConfigError("data.num_images must be at least 1 or null (no cap)")
        if not self.image_column:
            raise ConfigError("data.image_column must name a column")
        if not self.train_split or not self.eval_split:
            raise ConfigError("data.train_split and data.eval_split must be non-empty")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if not 0.0 <= self.hue_jitter <= 0.5:
            raise ConfigError(f"data.hue_jitter={self.hue_jitter} must be in [0, 0.5] (turns)")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be at least 1")


# ---------------------------------------------------------------------------------------------
# skipped images


@dataclass
class SkipStats:
    """Counts of skipped images per reason (`vqgpt.data.images.SKIP_REASONS`), with the first few
    offending names and what was wrong with them."""

    missing: int = 0  # named (in metadata.jsonl, on the command line) but not on disk
    empty: int = 0  # a file of 0 bytes
    not_an_image: int = 0  # no image format recognises the data
    truncated: int = 0  # the data ends early
    too_large: int = 0  # over max_image_pixels() (VQGPT_MAX_IMAGE_PIXELS raises it)
    unsupported_mode: int = 0  # a pixel mode that cannot become RGB
    unreadable: int = 0  # any other decoding failure (corrupt data)
    # images kept with text "" because they have no caption (not a skip: not in `total`);
    # counted by the training views (find_readable, StreamingImageTextDataset)
    no_caption: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 10

    @property
    def counts(self) -> Counter:
        """Skipped images per reason (reasons with none left out)."""
        return Counter({k: getattr(self, k) for k in SKIP_REASONS if getattr(self, k)})

    @property
    def total(self) -> int:
        """All skipped images."""
        return sum(getattr(self, k) for k in SKIP_REASONS)

    def add(self, reason: str, name: str, detail: str | None = None) -> None:
        """Count one skipped image under `reason` (a key of SKIP_REASONS)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{name} ({detail or SKIP_REASONS[reason]})")

    def add_skip(self, skip: ImageSkip, name: str) -> None:
        """Count one image `read_image` could not read."""
        self.add(skip.reason, name, skip.detail)

    def merge(self, other: SkipStats) -> None:
        """Add another record's counts into this one."""
        for k in (*SKIP_REASONS, "no_caption"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def __str__(self) -> str:
        uncaptioned = f"; {self.no_caption} image(s) without a caption (kept, text '')"
        uncaptioned = uncaptioned if self.no_caption else ""
        if not self.total:
            return "no images skipped" + uncaptioned
        shown = "; ".join(self.examples)
        return f"skipped {self.total} image(s) ({describe_skips(self.counts)}), e.g. {shown}" + (
            uncaptioned
        )


# ---------------------------------------------------------------------------------------------
# sources


def _image_text_features():
    import datasets

    return datasets.Features(image=datasets.Image(), text=datasets.Value("string"))


def _photos_dir() -> Path:
    try:
        import skimage
    except ImportError as err:
        raise DataError(
            "data.source='photos' needs scikit-image: pip install scikit-image "
            "(or pip install 'vqgpt[dev]')"
        ) from err
    return Path(os.path.dirname(skimage.__file__)) / "data"


def photos_dataset(cfg: PhotosConfig, split: str, image_size: int):  # -> datasets.Dataset
    """Random square crops (random scale, resized to image_size) of scikit-image's photos."""
    import datasets

    if split not in SPLITS:
        raise DataError(f"unknown photos split {split!r}; known: {', '.join(SPLITS)}")
    names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    folder = _photos_dir()
    photos = {n: load_rgb(folder / n) for n in names if (folder / n).is_file()}
    photos = {n: p for n, p in photos.items() if p is not None}
    if not photos:
        raise DataError(f"none of the {split} photos {sorted(names)} could be read in {folder}")
    order = sorted(photos)
    n = cfg.num_images if split == "train" else cfg.num_test_images
    images, texts = [], []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
        name = order[i % len(order)]  # every photo equally often
        photo = photos[name]
        side = round(min(photo.size) * rng.uniform(MIN_CROP_SCALE, 1.0))
        left = int(rng.integers(photo.width - side + 1))
        top = int(rng.integers(photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        images.append(crop.resize((image_size, image_size), Image.Resampling.BICUBIC))
        texts.append(f"a photo of {names[name]}")
    return datasets.Dataset.from_dict(
        {"image": images, "text": texts}, features=_image_text_features()
    )


def _read_metadata(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        log = read_json_lines(path)  # UTF-8 whatever the locale, a BOM dropped
    except FileReadError as err:
        raise DataError(str(err)) from None  # names the file and line
    if log.torn_tail is not None:
        tail = log.torn_tail[:60]
        raise DataError(
            f"{path}: the last line is not valid JSON ({tail!r}): complete or remove it"
        )
    for number, row in log.rows:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{path}:{number}: each line needs a 'file_name' string")
        rows.append(row)
    return rows


def _read_metadata_csv(path: Path) -> list[dict[str, Any]]:
    import csv

    from vqgpt.files import read_text

    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as CSV ({err})") from None
    if "file_name" not in (reader.fieldnames or []):
        raise DataError(
            f"{path}: the header needs a 'file_name' column (and 'text'); it has {reader.fieldnames}"
        )
    for number, row in enumerate(rows, start=2):
        if not row.get("file_name"):
            raise DataError(f"{path}:{number}: each row needs a file_name")
    return rows


def folder_dataset(folder: str | Path, split: str, stats: SkipStats | None = None):
    """Readable images of `<folder>/<split>/` (else the whole folder) with their captions:
    metadata.jsonl (JSON lines with file_name, text) or metadata.csv (columns file_name, text),
    else every image file with text ""."""
    import datasets

    root = Path(folder)
    if (root / split).is_dir():
        root = root / split
    stats = stats if stats is not None else SkipStats()
    if (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        jsonl = (root / "metadata.jsonl").is_file()
        read = _read_metadata if jsonl else _read_metadata_csv
        rows = read(root / ("metadata.jsonl" if jsonl else "metadata.csv"))
        pairs = [(root / row["file_name"], str(row.get("text") or "")) for row in rows]
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        pairs = [(p, "") for p in files if p.is_file()]
    paths, texts = [], []
    for path, text in pairs:
        skip = read_image(path).skip
        if skip is not None:
            stats.add_skip(skip, str(path))
        else:
            paths.append(str(path.resolve()))
            texts.append(text)
    if not paths:  # the error says what was skipped
        raise DataError(f"no readable images in {root} ({stats})")
    if stats.total:
        logger.warning("image folder %s: %s", root, stats)
    return datasets.Dataset.from_dict(
        {"image": paths, "text": texts}, features=_image_text_features()
    )


def _hub_dataset(cfg: DataConfig, split: str):
    import datasets

    from vqgpt.data.formats import standardize_columns

    if cfg.source.startswith(("/", "./", "../", "~")) or cfg.source.count("/") > 1:
        raise DataError(f"data.source={cfg.source!r} looks like a path, but it does not exist")
    try:
        ds = datasets.load_dataset(cfg.source, split=split, streaming=cfg.streaming)
    except Exception as err:  # offline, unknown name, unknown split: all end here
        raise DataError(
            f"data.source={cfg.source!r} is not 'shapes', 'photos' or an existing path, and "
            f"loading it from the Hugging Face Hub failed ({type(err).__name__}: {err}). "
            "Hub datasets need network access; offline, point data.source at local files."
        ) from err
    return standardize_columns(ds, cfg.image_column, cfg.text_column, where=cfg.source)


def _local_dataset(cfg: DataConfig, split: str, stats: SkipStats | None):
    """cfg.source as local files (None when it names none: a Hub name)."""
    from vqgpt.data import formats

    found = formats.find_data_files(cfg.source, cfg.format, split)
    if found is None:
        return None
    if found.format == "folder":
        ds = folder_dataset(found.files[0], split, stats)
        return ds.to_iterable_dataset() if cfg.streaming else ds
    if found.format == "webdataset":
        return formats.webdataset_dataset(found, cfg)
    return formats.table_dataset(found, cfg)


def load_image_dataset(cfg: DataConfig, split: str, stats: SkipStats | None = None):
    """The `split` of cfg.source: a datasets.Dataset, or a datasets.IterableDataset when
    cfg.streaming.

    Columns: `image` (values `read_image` accepts, never decoded here: a bad image is counted
    where it is read), `text` (str, "" when there is none) and the source's other columns
    unchanged; rows in a deterministic order (files sorted after expansion). Formats:
    `vqgpt.data.formats`. `stats`, when given, collects the images an image folder skipped (they
    are also logged); other formats keep bad rows for the reader to count. DataError: nothing
    at the path, a pattern matching nothing, a file that is not of its format, a missing column,
    a Hub name that cannot be loaded.
    """
    cap = cfg.num_images
    if cfg.source in ("shapes", "photos") and cfg.format in ("auto", "hub"):
        ds = _builtin_dataset(cfg, split)
        return ds.to_iterable_dataset() if cfg.streaming else ds
    ds = None if cfg.format == "hub" else _local_dataset(cfg, split, stats)
    if ds is None:
        ds = _hub_dataset(cfg, split)
    if cap is None:
        return ds
    return ds.take(cap) if cfg.streaming else ds.select(range(min(cap, len(ds))))


def _builtin_dataset(cfg: DataConfig, split: str):
    cap = cfg.num_images
    n = "num_images" if split == "train" else "num_test_images"
    if cfg.source == "shapes":
        shapes = cfg.shapes
        if cap is not None and split in SPLITS:
            shapes = replace(shapes, **{n: min(cap, getattr(shapes, n))})
        return shapes_dataset(shapes, split)
    photos = cfg.photos
    if cap is not None and split in SPLITS:
        photos = replace(photos, **{n: min(cap, getattr(photos, n))})
    return photos_dataset(photos, split, cfg.image_size)


# ---------------------------------------------------------------------------------------------
# training view


class Readable(NamedTuple):
    indices: list[int]  # rows whose image decodes
    stats: SkipStats


def _row_name(row: dict[str, Any], i: int) -> str:
    """A bad row's name for people: its image path, its WebDataset key, else its index."""
    value = row.get("image")
    name = value.get("path") if isinstance(value, dict) else None
    if row.get("__key__"):
        name = f"{row.get('__url__') or ''}:{row['__key__']}"
    return str(name or f"row {i}")


def undecoded(ds, column: str = "image"):  # -> the same kind of dataset
    """`ds` with its `datasets.Image` column `column` left as {bytes, path}: `read_image` decodes
    each value and counts a bad one instead of raising. Any other column: `ds` unchanged."""
    import datasets

    feature = ds.features.get(column) if ds.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def find_readable(ds, image_column: str = "image") -> Readable:
    """Decode every image once; the indices of the good rows and counts of the bad ones (and
    of the good ones without a caption)."""
    names = [c for c in (image_column, "text", "__key__", "__url__") if c in ds.column_names]
    column = undecoded(ds.select_columns(names), image_column)
    indices, stats = [], SkipStats()
    for i, row in enumerate(column):
        skip = read_image(row[image_column]).skip
        if skip is not None:
            stats.add_skip(skip, _row_name({**row, "image": row[image_column]}, i))
        else:
            indices.append(i)
            stats.no_caption += "text" in row and not row["text"]
    return Readable(indices, stats)


class ImageTextDataset(torch.utils.data.Dataset):
    """Good rows of a datasets.Dataset as {'pixel_values': [3, H, W], 'text': str}.

    Random crops (a transform with random_crop) are drawn per (seed, epoch, row): `set_epoch`
    before each epoch.
    """

    def __init__(self, hf_dataset, transform: ImageTransform, seed: int = 0) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.indices, self.stats = find_readable(hf_dataset)
        if self.stats.total:
            logger.warning("%s", self.stats)
        self.ds = undecoded(hf_dataset)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next crops are drawn for."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.ds[self.indices[i]]
        image, skip = read_image(row["image"])
        if image is None:  # it decoded in the up-front pass: the file changed since
            raise DataError(
                f"row {self.indices[i]} became unreadable after the validation pass ({skip.detail})"
            )
        pixels = self.transform(image, crop_seed=(self.seed, self.epoch, self.indices[i]))
        return {"pixel_values": pixels, "text": row.get("text") or ""}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixel_values into [B, 3, H, W]; texts as a list."""
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "text": [b["text"] for b in batch],
    }


def collate_pixels(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack pixel_values into [B, 3, H, W], nothing else: stage one needs no text, and under
    several processes Accelerate sends a streamed batch from rank 0 as tensors only."""
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch])}


class StreamingImageTextDataset(torch.utils.data.IterableDataset):
    """A datasets.IterableDataset as a stream of {'pixel_values': [3, H, W], 'text': str}.

    Rows whose image does not decode are skipped and counted in `stats` as they pass (in this
    process: with DataLoader workers each worker counts its own); rows without a caption are kept
    and counted. When `shuffle_buffer` is set the order is datasets' `shuffle(seed,
    buffer_size)`: shards shuffled, then rows through the buffer, reshuffled per `set_epoch`;
    the same in every process. Random crops are drawn per (seed, epoch, position in the stream).
    An epoch ends when the stream does (no len()).
    """

    def __init__(
        self, hf_dataset, transform: ImageTransform, seed: int = 0, shuffle_buffer: int = 0
    ) -> None:
        super().__init__()
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.stats = SkipStats()
        if shuffle_buffer:
            hf_dataset = hf_dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.ds = hf_dataset

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass: its shuffle order and its crops."""
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self):
        for i, row in enumerate(self.ds):
            image, skip = read_image(row["image"])
            if image is None:
                self.stats.add_skip(skip, _row_name(row, i))
                continue
            self.stats.no_caption += not row.get("text")
            pixels = self.transform(image, crop_seed=(self.seed, self.epoch, i))
            yield {"pixel_values": pixels, "text": row.get("text") or ""}


def image_text_dataset(
    cfg: DataConfig, split: str, train: bool, seed: int = 0, max_rows: int | None = None
) -> ImageTextDataset | StreamingImageTextDataset:
    """Load `split` and wrap it for training (random crop, flip and hue rotation only when
    `train` and cfg asks for them, drawn from `seed`).

    With cfg.streaming a training split is a `StreamingImageTextDataset` (shuffled through
    cfg.shuffle_buffer); any other split keeps its first `max_rows` rows (all when None) in
    memory as an `ImageTextDataset` (an evaluation set).
    """
    import datasets

    transform = ImageTransform(
        cfg.image_size,
        random_crop=train and cfg.random_crop,
        hflip=train and cfg.hflip,
        hue_jitter=cfg.hue_jitter if train else 0.0,
    )
    ds = load_image_dataset(cfg, split)
    if isinstance(ds, datasets.IterableDataset):
        if train:
            return StreamingImageTextDataset(ds, transform, seed, cfg.shuffle_buffer)
        rows = ds.take(max_rows) if max_rows is not None else ds
        ds = datasets.Dataset.from_list(list(rows), features=ds.features)
    elif max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ImageTextDataset(ds, transform, seed)


__all__ = [
    "DataConfig",
    "DataError",
    "ImageTextDataset",
    "ImageTransform",
    "PhotosConfig",
    "Readable",
    "SkipStats",
    "StreamingImageTextDataset",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "collate",
    "collate_pixels",
    "find_readable",
    "folder_dataset",
    "image_text_dataset",
    "load_image_dataset",
    "load_rgb",
    "photos_dataset",
    "undecoded",
]
