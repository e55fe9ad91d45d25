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
from vqgpt.data.images import (
    ImageTransform,
    SkippedFile,
    check_output_file,
    input_summary,
    list_images,
    nothing_readable,
    output_names,
    read_image,
    refuse_existing,
    refuse_input_as_output,
    to_pil,
)
from vqgpt.figures import save_reconstruction_grid
from vqgpt.files import write_text
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
    skipped: list[SkippedFile] = field(default_factory=list)  # files that could not be read
    repeated: list[Path] = field(default_factory=list)  # inputs given more than once (done once)
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """For stderr: the count, then one line per skipped or repeated input."""
        return input_summary(self.processed, "processed", self.skipped, self.repeated)


def _batches(
    files: list[Path], transform: ImageTransform, batch_size: int, result: CodecResult
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    names: list[Path] = []
    tensors: list[torch.Tensor] = []
    for f in tqdm(files, desc="images", disable=len(files) < 2 * batch_size):
        image, skip = read_image(f)
        if image is None:
            result.skipped.append(SkippedFile(f, skip))
            continue
        names.append(f)
        tensors.append(transform(image))
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)
    if len(result.skipped) == len(files):
        raise nothing_readable(result.skipped)


@torch.no_grad()
def encode_files(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path | None,
    batch_size: int = 32,
) -> CodecResult:
    """Write one JSON line per readable image: {"file", "codes" (h x w nested list)} to `out`
    (replaced if it exists) or stdout. No readable image: ImageInputError, and no `out`."""
    model = load_tokenizer_model(model_path)
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    files, repeated = list_images(inputs)
    if out:
        check_output_file(out, inputs, files)  # never written over an input image
    result = CodecResult(repeated=repeated)
    lines: list[str] = []
    sink = sys.stdout
    for names, pixels in _batches(files, transform, batch_size, result):
        for name, codes in zip(names, model.encode(pixels), strict=True):
            lines.append(json.dumps({"file": str(name), "codes": codes.tolist()}) + "\n")
            result.processed += 1
        if not out:  # stream to stdout batch by batch
            sink.writelines(lines)
            lines = []
    if out:  # written once every image is read: a failed run leaves no half file
        write_text(out, "".join(lines))
        result.outputs.append(Path(out))
    return result


@torch.no_grad()
def reconstruct_files(
    model_path: str | Path, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 32
) -> CodecResult:
    """Write `<file name>_recon.png` per readable image (`output_names`: `twin.png` ->
    `twin.png_recon.png`, a repeated file name gets `-2`, `-3`, ...), `grid.png` (originals above
    reconstructions) and `index.json` (input -> output, and the skipped inputs with the reason).

    Any of these names already in `out`: OutputExistsError before anything is done. No readable
    image: ImageInputError.
    """
    model = load_tokenizer_model(model_path)
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    out = Path(out)
    files, repeated = list_images(inputs)
    names = dict(zip(files, output_names(files, "_recon.png"), strict=True))
    outputs = [out / n for n in [*names.values(), "grid.png", "index.json"]]
    refuse_input_as_output(outputs, files)  # an input named like an output: not replaced
    refuse_existing(out, [*names.values(), "grid.png", "index.json"])
    result = CodecResult(repeated=repeated)
    originals: list[torch.Tensor] = []
    recons: list[torch.Tensor] = []
    index: dict[str, list] = {"outputs": [], "skipped": []}
    for batch, pixels in _batches(files, transform, batch_size, result):
        recon = model.decode(model.encode(pixels))
        out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
        for name, image in zip(batch, recon, strict=True):
            path = out / names[name]
            to_pil(image).save(path)
            result.outputs.append(path)
            result.processed += 1
            index["outputs"].append({"input": str(name), "output": path.name})
        originals += list(pixels)
        recons += list(recon)
    grid = out / "grid.png"
    save_reconstruction_grid(torch.stack(originals), torch.stack(recons), grid)
    result.outputs.append(grid)
    index["grid"] = grid.name
    index["skipped"] = [
        {"input": str(s.file), "reason": s.skip.reason, "detail": s.skip.detail}
        for s in result.skipped
    ]
    write_text(out / "index.json", json.dumps(index, indent=2) + "\n")
    result.outputs.append(out / "index.json")
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
