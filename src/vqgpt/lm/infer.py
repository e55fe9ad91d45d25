"""What users run: captions -> images (PNGs + a captioned grid), images -> captions (JSON lines)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vqgpt.data.images import ImageTransform, list_images, load_rgb, to_pil
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


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, blank lines skipped)."""
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        out += [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: give them as arguments or with --prompts FILE")
    return out


@dataclass
class GenerateResult:
    """Files written by `generate_to_folder`."""

    images: list[Path] = field(default_factory=list)
    grid: Path | None = None

    def summary(self) -> str:
        return f"{len(self.images)} image(s) written, grid: {self.grid}"


def generate_to_folder(
    model: str | Path, prompts: Sequence[str], n: int, sampling: SamplingConfig, out: str | Path
) -> GenerateResult:
    """PNGs `<prompt#>_<sample#>.png`, `prompts.jsonl` and `grid.png` (prompts under the tiles)."""
    pipe = Pipeline.from_pretrained(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = generate_images(pipe, prompts, n, sampling)
    result = GenerateResult()
    with (out / "prompts.jsonl").open("w", encoding="utf-8") as fh:
        for k, image in enumerate(images):
            p, j = divmod(k, n)
            path = out / f"{p:03d}_{j}.png"
            image.save(path)
            result.images.append(path)
            fh.write(json.dumps({"file": path.name, "prompt": prompts[p]}) + "\n")
    labels = [prompts[k // n] for k in range(len(images))]
    result.grid = captioned_grid(images, labels, out / "grid.png", ncol=max(n, 4))
    return result


def caption_files(
    model: str | Path, inputs: Sequence[str], sampling: SamplingConfig, out: str | None
) -> list[dict]:
    """Caption image files/folders; print `file<TAB>caption`, write JSON lines to `out`."""
    pipe = Pipeline.from_pretrained(model)
    files = list_images(inputs)
    good, images, records = [], [], []
    for f in files:
        image = load_rgb(f)
        if image is None:
            records.append({"file": str(f), "caption": None, "error": "unreadable image"})
            continue
        good.append(f)
        images.append(image)
    for f, text in zip(good, caption_images(pipe, images, sampling), strict=True):
        records.append({"file": str(f), "caption": text})
    records.sort(key=lambda r: files.index(Path(r["file"])))
    for r in records:
        print(
            f"{r['file']}\t{r['caption'] if r['caption'] is not None else '<' + r['error'] + '>'}"
        )
    if out:
        write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    skipped = sum(r["caption"] is None for r in records)
    if skipped:
        print(f"{skipped} unreadable file(s) skipped", file=sys.stderr)
    return records
