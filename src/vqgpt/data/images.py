"""Image files in: robust decoding to RGB, the square crop and scaling of training, tensor -> PIL.

Unreadable images give None from `load_rgb`, never an exception; odd modes (L, LA, P, RGBA, CMYK,
I;16, I, F, 1) become RGB. The mode conversion, the resize and the crop are the exported image
processor's own functions (`vqgpt.export.hub.image_processing_vqgpt`): what a model trains on is
what its export feeds it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from vqgpt.export.hub.image_processing_vqgpt import (
    center_offsets,
    crop_to_tensor,
    resize_shorter_side,
    to_rgb,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

ImageSource = str | os.PathLike | bytes | Image.Image | dict


def _open(src: ImageSource) -> Image.Image:
    if isinstance(src, dict):  # the datasets Image feature, undecoded
        src = src["bytes"] if src.get("bytes") is not None else src.get("path")
        if src is None:
            raise ValueError("neither bytes nor path")
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        image = Image.open(io.BytesIO(src))
    else:
        image = Image.open(src)
    image.load()  # decode now: truncated data fails here, not later
    return image


def load_rgb(src: ImageSource) -> Image.Image | None:
    """Any image (path, bytes, PIL image, datasets dict) as RGB; None when it cannot be read."""
    try:
        return to_rgb(_open(src))
    except Exception:  # PIL plugins raise a zoo of types on bad data (OSError, SyntaxError, ...)
        return None


# ---------------------------------------------------------------------------------------------
# transforms


class ImageTransform:
    """Resize the shorter side to image_size, crop a square (centre or random), scale to [-1, 1]."""

    def __init__(self, image_size: int, random_crop: bool = False) -> None:
        self.image_size = image_size
        self.random_crop = random_crop

    def __call__(self, image: Image.Image, crop_seed: Sequence[int] = (0,)) -> torch.Tensor:
        """RGB PIL image -> float tensor [3, image_size, image_size] in [-1, 1].

        A random crop is a function of `crop_seed` (the dataset passes (seed, epoch, row)), not of
        a global RNG: the same in one or N processes, with any number of DataLoader workers, and
        after a resume.
        """
        s = self.image_size
        image = resize_shorter_side(image, s)
        if self.random_crop:
            rng = np.random.default_rng(list(crop_seed))
            left = int(rng.integers(image.width - s + 1))
            top = int(rng.integers(image.height - s + 1))
        else:
            left, top = center_offsets(image, s)
        return crop_to_tensor(image, left, top, s)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] -> RGB PIL image (values outside are clipped)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"to_pil expects a [3, H, W] tensor, got shape {tuple(pixels.shape)}")
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(rearrange(x, "c h w -> h w c").numpy())


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files
