"""Image processor of the vqgpt image tokenizer: the exact resize, crop and scaling of training.

Self-contained remote code (imports numpy, PIL, torch and transformers), and the one
implementation of it: vqgpt's own `load_rgb` and `ImageTransform` (`vqgpt.data.images`) call
`to_rgb`, `resize_shorter_side` and `crop_to_tensor` from this file. Per image:
1. to RGB (EXIF orientation applied; transparency composited on white; 16-bit and float
   grayscale scaled to 8 bits);
2. resize so the shorter side is `image_size` (PIL bicubic, antialiased, `reducing_gap=3`);
3. centre crop to `image_size` x `image_size`;
4. scale uint8 to [-1, 1] as `x / 127.5 - 1` (float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float grayscale -> 8-bit L, scaled, not clipped."""
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        a = a / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F" and a.min() >= 0.0 and a.max() <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif a.min() >= 0.0 and a.max() <= 255.0:
        pass  # already in 8-bit range
    elif image.mode == "I" and a.min() >= 0.0 and a.max() <= 65535.0:
        a = a / 257.0  # 16-bit PNGs opened as I
    else:
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (transparent areas become white)."""
    image = ImageOps.exif_transpose(image)
    if (image.mode == "P" and "transparency" in image.info) or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    if image.mode in ("LA", "La", "RGBA", "RGBa"):  # composite on white
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _as_pil(image: Any) -> Image.Image:
    """PIL image, or a uint8 array / tensor [H, W], [H, W, C] or [C, H, W] -> PIL image."""
    if isinstance(image, Image.Image):
        return image
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"array images must be uint8 (0..255), got {array.dtype}; pass PIL images for "
            "other depths"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"an image array must be [H, W] or [H, W, C], got {array.shape}")
    return Image.fromarray(array)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (PIL bicubic, antialiased, `reducing_gap=3`)."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new == image.size:
        return image
    return image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)  # widens with the scale


def center_offsets(image: Image.Image, size: int) -> tuple[int, int]:
    """(left, top) of the centred `size` x `size` crop."""
    w, h = image.size
    return (w - size) // 2, (h - size) // 2


def crop_to_tensor(image: Image.Image, left: int, top: int, size: int) -> torch.Tensor:
    """The `size` x `size` crop at (left, top) of an RGB image -> float32 [3, size, size] in
    [-1, 1] (`x / 127.5 - 1`)."""
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, size, size)


class VQGPTImageProcessor(BaseImageProcessor):
    """Images -> `pixel_values` [B, 3, image_size, image_size] in [-1, 1], as vqgpt trains."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size

    def transform(self, image: Any) -> torch.Tensor:
        """One image -> float32 tensor [3, image_size, image_size] in [-1, 1]."""
        image = resize_shorter_side(to_rgb(_as_pil(image)), self.image_size)
        return crop_to_tensor(image, *center_offsets(image, self.image_size), self.image_size)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any):
        """One image or a list -> BatchFeature(pixel_values=[B, 3, S, S]); "np" gives numpy."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}: resizing is fixed by training")
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            is_batch = not isinstance(images, Image.Image) and np.ndim(images) == 4
            images = list(images) if is_batch else [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        pixels = torch.stack([self.transform(im) for im in images])  # (B, 3, S, S)
        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": pixels.numpy()})
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return BatchFeature(data={"pixel_values": pixels})

    def __call__(self, images: Any, **kwargs: Any):
        """Same as `preprocess`."""
        return self.preprocess(images, **kwargs)
