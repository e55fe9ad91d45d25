"""What users run: captions -> images (PNGs + a captioned grid), images -> captions (JSON lines).

Data goes to files or stdout, messages (counts, skipped inputs) to the caller (the CLI prints them
on stderr); a call that would produce nothing raises instead of succeeding quietly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vqgpt.data.images import (
    ImageTransform,
    SkippedFile,
    check_output_file,
    input_summary,
    list_images,
    nothing_readable,
    read_image,
    refuse_existing,
    to_pil,
)
from vqgpt.figures import captioned_grid
from vqgpt.files import read_text, write_text
from vqgpt.lm.generate import generate_captions, generate_image_codes
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.sampling import SamplingConfig


@torch.no_grad()
def generate_images(
    pipe: Pipeline, prompts: Sequence[str], n: int, sampling: SamplingConfig
) -> list[Image.Image]:
    """`n` images per prompt, prompt-major ([p0 x n, p1 x n, ...])."""
    ids = pipe.tokenizer.encode_texts([p.strip() for p in prompts])
    rows = [ids[i] for i in range(len(prompts)) for _ in range(n)]
    if not rows:
        return []
    codes = generate_image_codes(pipe.lm, pipe.layout, rows, sampling)  # (P*n, h, w)
    images = []
    for start in range(0, len(codes), 64):
        pixels = pipe.image_tokenizer.decode(codes[start : start + 64].to(pipe.device))
        images += [to_pil(p) for p in pixels.cpu()]
    return images


@torch.no_grad()
def caption_images(
    pipe: Pipeline, images: Sequence[Image.Image], sampling: SamplingConfig
) -> list[str]:
    """One caption per image (encoded by the pipeline's image tokenizer, then decoded as text)."""
    if not images:
        return []
    transform = ImageTransform(pipe.image_tokenizer.config.arch.image_size, random_crop=False)
    pixels = torch.stack([transform(im) for im in images]).to(pipe.device)
    codes = torch.cat(
        [pipe.image_tokenizer.encode(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    )
    ids = generate_captions(pipe.lm, pipe.layout, codes, sampling)
    return [text.strip() for text in pipe.tokenizer.decode_texts(ids)]


def text_lines(text: str) -> list[str]:
    """The lines of a user's text file: split at line ends only ("\\n", "\\r\\n", "\\r"), not at
    the other breaks `str.splitlines` knows (U+2028, U+0085, \\x0b, \\x0c, \\x1c-\\x1e): those are
    characters of a line."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, `text_lines`); blank ones are
    left out, and none left is a ValueError."""
    out = [p for p in prompts if p.strip()]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        out += [line.strip() for line in text_lines(read_text(path)) if line.strip()]
    if not out:
        given = " (every prompt given is blank)" if prompts or prompts_file else ""
        raise ValueError(f"no prompts{given}: give them as arguments or with --prompts FILE")
    return out


@dataclass
class GenerateResult:
    """Files written by `generate_to_folder`."""

    images: list[Path] = field(default_factory=list)
    grid: Path | None = None

    def summary(self) -> str:
        """For stderr."""
        return f"{len(self.images)} image(s) written, grid: {self.grid}"


def generate_names(num_prompts: int, n: int) -> list[str]:
    """`<prompt#>_<sample#>.png` (prompt numbers 3 digits or more, both from 0), prompt-major."""
    return [f"{p:03d}_{j}.png" for p in range(num_prompts) for j in range(n)]


def generate_to_folder(
    model: str | Path, prompts: Sequence[str], n: int, sampling: SamplingConfig, out: str | Path
) -> GenerateResult:
    """PNGs `<prompt#>_<sample#>.png` (`generate_names`), `prompts.jsonl` (the index: one line per
    PNG, {"file", "prompt"}) and `grid.png` (prompts under the tiles).

    Any of these names already in `out`: OutputExistsError before anything is drawn.
    """
    if n < 1:
        raise ValueError(f"-n {n}: draw at least one image per prompt")
    out = Path(out)
    names = generate_names(len(prompts), n)
    refuse_existing(out, [*names, "prompts.jsonl", "grid.png"])
    pipe = Pipeline.from_pretrained(model)
    images = generate_images(pipe, prompts, n, sampling)
    out.mkdir(parents=True, exist_ok=True)
    result = GenerateResult()
    with (out / "prompts.jsonl").open("w", encoding="utf-8") as fh:
        for k, (image, name) in enumerate(zip(images, names, strict=True)):
            path = out / name
            image.save(path)
            result.images.append(path)
            fh.write(json.dumps({"file": path.name, "prompt": prompts[k // n]}) + "\n")
    labels = [prompts[k // n] for k in range(len(images))]
    result.grid = captioned_grid(images, labels, out / "grid.png", ncol=max(n, 4))
    return result


@dataclass
class CaptionResult:
    """What `caption_files` did."""

    records: list[dict] = field(default_factory=list)  # {"file", "caption"} per captioned image
    skipped: list[SkippedFile] = field(default_factory=list)
    repeated: list[Path] = field(default_factory=list)  # inputs given more than once

    def summary(self) -> str:
        """For stderr: the count, then one line per skipped or repeated input."""
        return input_summary(len(self.records), "captioned", self.skipped, self.repeated)


def caption_files(
    model: str | Path, inputs: Sequence[str], sampling: SamplingConfig, out: str | None
) -> CaptionResult:
    """Caption image files/folders: one JSON line {"file", "caption"} per readable image, in input
    order, to `out` (replaced if it exists) or else stdout. No readable image: ImageInputError."""
    files, repeated = list_images(inputs)
    if out:
        check_output_file(out, inputs, files)  # never written over an input image
    result = CaptionResult(repeated=repeated)
    good, images = [], []
    for f in files:
        image, skip = read_image(f)
        if image is None:
            result.skipped.append(SkippedFile(f, skip))
            continue
        good.append(f)
        images.append(image)
    if not images:
        raise nothing_readable(result.skipped)
    pipe = Pipeline.from_pretrained(model)
    for f, text in zip(good, caption_images(pipe, images, sampling), strict=True):
        result.records.append({"file": str(f), "caption": text})
    lines = "".join(json.dumps(r) + "\n" for r in result.records)
    if out:
        write_text(out, lines)
    else:
        sys.stdout.write(lines)
    return result
