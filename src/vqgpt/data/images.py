"""Image files in: robust decoding to RGB, the square crop and scaling of training, tensor -> PIL.

`read_image` never raises on bad data: it gives the image or an `ImageSkip` saying why not
(`SKIP_REASONS`: missing file, empty file, not an image, truncated, too large, unsupported mode,
unreadable); `load_rgb` is the image or None. Odd modes (L, LA, P, RGBA, CMYK, I;16, I, F, 1)
become RGB. Images over `max_image_pixels()` pixels (PIL's decompression-bomb limit, 89,478,485 by
default) are skipped as too large; the environment variable VQGPT_MAX_IMAGE_PIXELS raises the
limit (0: no limit). The mode conversion, the resize and the crop are the exported image
processor's own functions (`vqgpt.export.hub.image_processing_vqgpt`): what a model trains on is
what its export feeds it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from PIL import Image, UnidentifiedImageError

from vqgpt.errors import VqgptError
from vqgpt.export.hub.image_processing_vqgpt import (
    center_offsets,
    crop_to_tensor,
    resize_shorter_side,
    to_rgb,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

ImageSource = str | os.PathLike | bytes | Image.Image | dict


# why an image was skipped: reason -> what a user reads
SKIP_REASONS = {
    "missing": "missing file",
    "empty": "empty file",
    "not_an_image": "not an image",
    "truncated": "truncated",
    "too_large": "too large",
    "unsupported_mode": "unsupported mode",
    "unreadable": "unreadable",  # anything else a decoder rejects (corrupt data)
}

MAX_PIXELS_ENV = "VQGPT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default (Image.MAX_IMAGE_PIXELS)


class ImageInputError(VqgptError, ValueError):
    """Image inputs that give nothing to work on: no image files, or none of them readable."""


class OutputExistsError(VqgptError, FileExistsError):
    """A command would replace a file that was there before it ran."""


class ImageSkip(NamedTuple):
    """Why one image could not be read."""

    reason: str  # a key of SKIP_REASONS
    detail: str  # one line for people, e.g. "too large: 20000x10000 pixels, over ..."


class ReadImage(NamedTuple):
    """`read_image`'s answer: the RGB image, or why there is none."""

    image: Image.Image | None
    skip: ImageSkip | None


def max_image_pixels() -> int | None:
    """The largest image (in pixels) vqgpt decodes: VQGPT_MAX_IMAGE_PIXELS, else PIL's default;
    None means no limit (the variable set to 0). A value that is not a whole number: ImageInputError.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit():
        raise ImageInputError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} must be a whole number of pixels "
            "(0 = no limit)"
        )
    return int(text) or None


def _too_large(width: int, height: int, limit: int) -> ImageSkip:
    return ImageSkip(
        "too_large",
        f"too large: {width}x{height} = {width * height:,} pixels, over the limit of "
        f"{limit:,} (raise it with the environment variable {MAX_PIXELS_ENV}=<pixels>, "
        "0 = no limit)",
    )


def _open(src: ImageSource | None) -> Image.Image:
    if src is None:  # a row with no image (a WebDataset key without an image member)
        raise FileNotFoundError("no image")
    if isinstance(src, dict):  # the datasets Image feature, undecoded
        src = src["bytes"] if src.get("bytes") is not None else src.get("path")
        if src is None:
            raise FileNotFoundError("neither bytes nor path")
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise EOFError("no bytes")
        return Image.open(io.BytesIO(src))
    if os.path.isfile(src) and os.path.getsize(src) == 0:
        raise EOFError("no bytes")
    return Image.open(src)


def _classify(err: Exception) -> ImageSkip:
    """The skip reason of an exception raised while opening or decoding an image."""
    text = str(err)
    if isinstance(err, FileNotFoundError):
        return ImageSkip("missing", "missing file")
    if isinstance(err, EOFError) and text == "no bytes":
        return ImageSkip("empty", "empty file (0 bytes)")
    if isinstance(err, UnidentifiedImageError):
        return ImageSkip("not_an_image", "not an image (no image format recognises the data)")
    if "truncated" in text or isinstance(err, EOFError):
        return ImageSkip("truncated", f"truncated ({text or 'the data ends early'})")
    if "mode" in text.lower() and isinstance(err, (ValueError, KeyError, OSError)):
        return ImageSkip("unsupported_mode", f"unsupported mode ({text})")
    return ImageSkip("unreadable", f"unreadable ({type(err).__name__}: {text})")


def read_image(src: ImageSource | None) -> ReadImage:
    """Any image (path, bytes, PIL image, datasets dict) as RGB, or why it cannot be read
    (None: missing).

    Never raises on bad data; the size limit is `max_image_pixels()` (checked on the header,
    before any pixel is decoded).
    """
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # vqgpt applies its own limit below; PIL's (2x its limit, an error) must not differ
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = _open(src)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        width, height = image.size
        if limit is not None and width * height > limit:
            return ReadImage(None, _too_large(width, height, limit))
        image.load()  # decode now: truncated data fails here, not later
        try:
            rgb = to_rgb(image)
        except Exception:  # a mode the converters do not know
            return ReadImage(None, ImageSkip("unsupported_mode", f"unsupported mode {image.mode}"))
        return ReadImage(rgb, None)
    except (
        Exception
    ) as err:  # PIL plugins raise a zoo of types on bad data (OSError, SyntaxError, ...)
        return ReadImage(None, _classify(err))


def load_rgb(src: ImageSource) -> Image.Image | None:
    """Any image (path, bytes, PIL image, datasets dict) as RGB; None when it cannot be read
    (`read_image` says why)."""
    return read_image(src).image


def describe_skips(counts: Counter) -> str:
    """`truncated: 2, too large: 1` for counts per skip reason (in SKIP_REASONS order)."""
    return ", ".join(f"{SKIP_REASONS[k]}: {counts[k]}" for k in SKIP_REASONS if counts.get(k))


class SkippedFile(NamedTuple):
    """An input file a command could not read."""

    file: Path
    skip: ImageSkip


def input_summary(
    done: int, verb: str, skipped: Sequence[SkippedFile], repeated: Sequence[Path]
) -> str:
    """For a command's stderr: `N image(s) VERB[, K skipped (reason: count, ...)]`, then
    `skipped FILE: why` per skipped file and one line per input given more than once."""
    lines = [f"{done} image(s) {verb}"]
    if skipped:
        counts = Counter(s.skip.reason for s in skipped)
        lines[0] += f", {len(skipped)} skipped ({describe_skips(counts)})"
        lines += [f"skipped {s.file}: {s.skip.detail}" for s in skipped]
    times = Counter(repeated)  # in input order (a Counter keeps first insertion)
    lines += [
        f"{f}: given {'more than once' if n == 1 else f'{n + 1} times'}, {verb} once"
        for f, n in times.items()
    ]
    return "\n".join(lines)


def nothing_readable(skipped: Sequence[SkippedFile]) -> ImageInputError:
    """The error of a command none of whose input images could be read (one line)."""
    shown = "; ".join(f"{s.file}: {s.skip.detail}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return ImageInputError(f"none of the {len(skipped)} image(s) could be read: {shown}{more}")


# ---------------------------------------------------------------------------------------------
# transforms


class ImageTransform:
    """Resize the shorter side to image_size, crop a square (centre or random), scale to [-1, 1];
    for training, optionally flip left-right and rotate the hue (augmentation)."""

    def __init__(
        self,
        image_size: int,
        random_crop: bool = False,
        hflip: bool = False,
        hue_jitter: float = 0.0,
    ) -> None:
        if not 0.0 <= hue_jitter <= 0.5:
            raise ValueError(
                f"hue_jitter={hue_jitter} must be in [0, 0.5] (turns of the hue circle)"
            )
        self.image_size = image_size
        self.random_crop = random_crop
        self.hflip = hflip
        self.hue_jitter = hue_jitter

    def __call__(self, image: Image.Image, crop_seed: Sequence[int] = (0,)) -> torch.Tensor:
        """RGB PIL image -> float tensor [3, image_size, image_size] in [-1, 1].

        A random crop, flip (probability 1/2) and hue rotation (uniform in +-hue_jitter turns)
        are a function of `crop_seed` (the dataset passes (seed, epoch, row)), not of a global
        RNG: the same in one or N processes, with any number of DataLoader workers, and after a
        resume. The crop's draws come first, so turning augmentation on moves no crop.
        """
        s = self.image_size
        image = resize_shorter_side(image, s)
        rng = np.random.default_rng(list(crop_seed))
        if self.random_crop:
            left = int(rng.integers(image.width - s + 1))
            top = int(rng.integers(image.height - s + 1))
        else:
            left, top = center_offsets(image, s)
        image = image.crop((left, top, left + s, top + s))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.hue_jitter:
            image = rotate_hue(image, rng.uniform(-self.hue_jitter, self.hue_jitter))
        return crop_to_tensor(image, 0, 0, s)


def rotate_hue(image: Image.Image, turns: float) -> Image.Image:
    """`image` (RGB) with every pixel's hue rotated by `turns` of the hue circle (PIL's 8-bit
    HSV: saturation and value kept, grey pixels unchanged; the round trip rounds each channel
    by at most a few levels)."""
    shift = round(turns * 256) % 256
    if shift == 0:
        return image
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] -> RGB PIL image (values outside are clipped)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"to_pil expects a [3, H, W] tensor, got shape {tuple(pixels.shape)}")
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(rearrange(x, "c h w -> h w c").numpy())


class ImageFiles(NamedTuple):
    """`list_images`' answer: the files in order, and the ones given more than once."""

    files: list[Path]
    repeated: list[Path]  # inputs that named a file already listed (it is listed once)


def list_images(inputs: Sequence[str | Path]) -> ImageFiles:
    """Files as given, folders expanded to their image files (sorted); each file once.

    A missing input is a FileNotFoundError; no image file at all is an ImageInputError.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    repeated: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )  # a folder named dir.png is no image
        elif p.exists():
            found = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
        for f in found:
            key = f.resolve()
            if key in seen:
                repeated.append(f)
                continue
            seen.add(key)
            files.append(f)
    if not files:
        raise ImageInputError(
            f"no image files in {', '.join(map(str, inputs)) or 'the inputs'} (folders are "
            f"searched for {' '.join(IMAGE_EXTENSIONS)})"
        )
    return ImageFiles(files, repeated)


def output_names(files: Sequence[Path], tail: str) -> list[str]:
    """One output file name per input, all different: the input's file name (suffix kept) plus
    `tail` (`twin.png` -> `twin.png_recon.png`); a file name seen before (the same name in two
    folders) gets `-2`, `-3`, ... in input order (`twin.png_recon-2.png`)."""
    stem, dot, ext = tail.rpartition(".")
    stem, ext = (stem, dot + ext) if dot else (tail, "")
    names: list[str] = []
    taken: set[str] = set()
    for f in files:
        name, k = f"{f.name}{stem}{ext}", 1
        while name in taken:
            k += 1
            name = f"{f.name}{stem}-{k}{ext}"
        taken.add(name)
        names.append(name)
    return names


def refuse_input_as_output(
    outputs: Sequence[str | Path], inputs: Sequence[str | Path], option: str = "--out"
) -> None:
    """Raise an OutputExistsError when one of `outputs` is one of `inputs` (the same file, by
    resolved path, through symlinks): writing it would destroy an input."""
    given = {Path(i).resolve(): Path(i) for i in inputs}
    for out in outputs:
        key = Path(out).resolve()
        if key in given:
            raise OutputExistsError(
                f"{option} {out} is the input {given[key]}: writing it would destroy that input; "
                f"give {option} another path"
            )


def check_output_file(
    out: str | Path, inputs: Sequence[str | Path], files: Sequence[Path], option: str = "--out"
) -> None:
    """Before anything is written: `option` FILE must not be an input (given, or found in an
    input folder) nor a folder. OutputExistsError otherwise."""
    refuse_input_as_output([out], [*files, *inputs], option)
    if Path(out).is_dir():
        raise OutputExistsError(f"{option} {out} is a folder: give the path of a file")


def refuse_existing(folder: Path, names: Sequence[str], option: str = "--out") -> None:
    """Raise an OutputExistsError naming the first of `names` that already exists in `folder`:
    vqgpt never replaces a file it did not just write."""
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(
            f"{folder / existing[0]} already exists{more}: vqgpt does not replace files; give "
            f"{option} a new or empty folder, or remove them"
        )
