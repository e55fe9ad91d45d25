"""Applying a trained image tokenizer to files: images -> code ids, images -> reconstructions."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from vqgpt.artifacts import image_tokenizer_dir
from vqgpt.data.images import ImageTransform, list_images, load_rgb, to_pil
from vqgpt.figures import save_reconstruction_grid
from vqgpt.tokenizer.vqvae import VQVAE


def resolve_model_dir(path: str | Path) -> Path:
    """The image tokenizer's folder in a tokenizer run, an LM run, a pipeline or an export,
    checked to hold what it must (`vqgpt.artifacts.IMAGE_TOKENIZER`)."""
    return image_tokenizer_dir(path)


def load_tokenizer_model(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """Load a trained VQVAE for inference."""
    return VQVAE.load(resolve_model_dir(path)).to(device).eval()


@dataclass
class CodecResult:
    """What a batch job over files did."""

    processed: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable files
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.processed} image(s) processed"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (unreadable): {', '.join(self.skipped[:5])}"
            text += " ..." if len(self.skipped) > 5 else ""
        return text


def _batches(
    files: list[Path], transform: ImageTransform, batch_size: int, result: CodecResult
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    names: list[Path] = []
    tensors: list[torch.Tensor] = []
    for f in tqdm(files, desc="images", disable=len(files) < 2 * batch_size):
        image = load_rgb(f)
        if image is None:
            result.skipped.append(str(f))
            continue
        names.append(f)
        tensors.append(transform(image))
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


@torch.no_grad()
def encode_files(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path | None,
    batch_size: int = 32,
) -> CodecResult:
    """Write one JSON line per readable image: {"file", "codes" (h x w nested list)}."""
    model = load_tokenizer_model(model_path)
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    result = CodecResult()
    sink = open(out, "w") if out else sys.stdout  # noqa: SIM115 - closed below
    try:
        for names, pixels in _batches(list_images(inputs), transform, batch_size, result):
            for name, codes in zip(names, model.encode(pixels), strict=True):
                sink.write(json.dumps({"file": str(name), "codes": codes.tolist()}) + "\n")
                result.processed += 1
    finally:
        if out:
            sink.close()
            result.outputs.append(Path(out))
    return result


@torch.no_grad()
def reconstruct_files(
    model_path: str | Path, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 32
) -> CodecResult:
    """Write <stem>_recon.png per readable image and grid.png (originals above reconstructions)."""
    model = load_tokenizer_model(model_path)
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = CodecResult()
    originals: list[torch.Tensor] = []
    recons: list[torch.Tensor] = []
    for names, pixels in _batches(list_images(inputs), transform, batch_size, result):
        recon = model.decode(model.encode(pixels))
        for name, image in zip(names, recon, strict=True):
            path = out / f"{name.stem}_recon.png"
            to_pil(image).save(path)
            result.outputs.append(path)
            result.processed += 1
        originals += list(pixels)
        recons += list(recon)
    if originals:
        grid = out / "grid.png"
        save_reconstruction_grid(torch.stack(originals), torch.stack(recons), grid)
        result.outputs.append(grid)
    return result


@torch.no_grad()
def reconstruct_images(
    model: VQVAE, images: Sequence[Image.Image], batch_size: int = 64
) -> list[Image.Image]:
    """PIL images -> decode(encode(image)) as PIL images (centre crop at the model's size)."""
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(im) for im in images[start : start + batch_size]])
        out += [to_pil(p) for p in model.decode(model.encode(pixels.to(device))).cpu()]
    return out
