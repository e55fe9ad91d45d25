"""What users run: captions -> images (PNGs + a captioned grid), images -> captions (JSON lines),
documents -> their continuation (Markdown with inline PNGs + JSON lines).

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

from vqgpt.data.documents import parse_document_line
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
from vqgpt.lm.continuation import continue_document_ids, document_prompt, split_continuation
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
    return decode_codes(pipe, codes)


@torch.no_grad()
def encode_images(pipe: Pipeline, images: Sequence[Image.Image]) -> torch.Tensor:
    """Codes [B, h, w] of RGB images (centre-cropped, resized) by the pipeline's image tokenizer."""
    transform = ImageTransform(pipe.image_tokenizer.config.arch.image_size, random_crop=False)
    pixels = torch.stack([transform(im) for im in images]).to(pipe.device)
    return torch.cat(
        [pipe.image_tokenizer.encode(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    )


@torch.no_grad()
def decode_codes(pipe: Pipeline, codes: torch.Tensor) -> list[Image.Image]:
    """RGB images of codes [B, h, w] by the pipeline's image tokenizer."""
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
    ids = generate_captions(pipe.lm, pipe.layout, encode_images(pipe, images), sampling)
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


# ---------------------------------------------------------------------------------------------
# documents: text and images, continued

# a prompt: raw text (the strings `<|boi|>`, `<|eoi|>`, `<|img_00042|>`, `<|endoftext|>` in it are
# those tokens), or segments in order: text, an RGB image, or one image's codes [h, w]
DocumentPrompt = str | Sequence[str | Image.Image | torch.Tensor]


@dataclass
class ContinuedDocument:
    """One prompt's continuation (`continue_documents`)."""

    prompt: list[str | Image.Image]  # the prompt as the model read it (images decoded)
    segments: list[str | Image.Image]  # what was generated, in order: text and images
    prompt_tokens: int
    new_tokens: int
    stop: str  # vqgpt.lm.continuation.STOP_REASONS: eos, max_new_tokens, max_images, n_positions

    @property
    def images(self) -> list[Image.Image]:
        """The generated images."""
        return [s for s in self.segments if isinstance(s, Image.Image)]


def document_ids(pipe: Pipeline, prompt: DocumentPrompt) -> list[int]:
    """A prompt's joint ids: `eos` then its segments as training's `build_document` writes them
    (no closing eos). Raw text goes through the whole joint vocabulary, so it may name tokens."""
    layout = pipe.layout
    if isinstance(prompt, str):
        raw = pipe.tokenizer.hf.backend_tokenizer.encode(prompt, add_special_tokens=False)
        return [layout.eos_id, *raw.ids]
    segments = list(prompt)
    pil = [i for i, s in enumerate(segments) if isinstance(s, Image.Image)]
    if pil:
        codes = encode_images(pipe, [segments[i] for i in pil]).cpu()
        for i, c in zip(pil, codes, strict=True):
            segments[i] = c
    return document_prompt(segments, layout, pipe.tokenizer)


def _segments(pipe: Pipeline, ids: list[int]) -> list[str | Image.Image]:
    """Joint ids -> text and decoded images, in order."""
    parts = split_continuation(ids, pipe.layout)
    codes = [p for p in parts if isinstance(p, torch.Tensor)]
    images = iter(decode_codes(pipe, torch.stack(codes)) if codes else [])
    return [next(images) if isinstance(p, torch.Tensor) else pipe.tokenizer.decode_text(p) for p in parts]  # fmt: skip


@torch.no_grad()
def continue_documents(
    pipe: Pipeline,
    prompts: Sequence[DocumentPrompt],
    sampling: SamplingConfig,
    max_new_tokens: int = 256,
    max_images: int = 4,
    unconditional: str = "caption_dropped",
) -> list[ContinuedDocument]:
    """Continue each document prompt with text and images (`vqgpt.lm.continuation`): up to
    `max_new_tokens` new tokens and `max_images` images, never past the model's n_positions.

    A prompt that ends inside an image, or leaves no room to continue, is a ValueError naming it.
    """
    ids = [document_ids(pipe, p) for p in prompts]
    runs = continue_document_ids(
        pipe.lm, pipe.layout, ids, sampling, max_new_tokens, max_images, unconditional
    )
    return [
        ContinuedDocument(
            _segments(pipe, row), _segments(pipe, run.tokens), len(row), len(run.tokens), run.stop
        )
        for row, run in zip(ids, runs, strict=True)
    ]


DOCUMENT_SUFFIXES = (".jsonl", ".txt", ".md")


def _json_document(line: str, where: str, folder: Path) -> list[str | Image.Image]:
    """One JSON Lines document (`vqgpt.data.documents`' format) -> text and images, every image
    read now (an unreadable one is an error: a prompt is not a corpus to skip rows of)."""
    out: list[str | Image.Image] = []
    for j, seg in enumerate(parse_document_line(line, where, folder)):
        if seg["text"] is not None:
            out.append(seg["text"])
            continue
        path = seg["image"]["path"]
        image, skip = read_image(path)
        if image is None:
            raise ValueError(f"{where}: segment {j}: {path}: {skip.detail}")
        out.append(image)
    return out


def read_documents(sources: Sequence[str]) -> list[tuple[str, DocumentPrompt]]:
    """(where, prompt) for each `--document` value: a `.jsonl` file (one document a line, image
    paths relative to the file), another text file (one raw-text prompt), or the text itself.
    A value ending in .jsonl/.txt/.md that is no file is a FileNotFoundError."""
    out: list[tuple[str, DocumentPrompt]] = []
    for source in sources:
        path = Path(source)
        try:
            is_file = path.is_file()
        except OSError:  # text too long to be a file name
            is_file = False
        if not is_file:
            if path.suffix.lower() in DOCUMENT_SUFFIXES:
                raise FileNotFoundError(f"--document {source}: no such file")
            if source.strip():
                out.append((source, source))
            continue
        text = read_text(path)
        if path.suffix.lower() != ".jsonl":
            if text.strip():
                out.append((str(path), text))
            continue
        for n, line in enumerate(text_lines(text), start=1):
            if line.strip():
                where = f"{path}:{n}"
                out.append((where, _json_document(line, where, path.parent)))
    if not out:
        raise ValueError("no document to continue: every --document given is blank or empty")
    return out


@dataclass
class DocumentsResult:
    """Files written by `continue_to_folder`."""

    markdown: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    index: Path | None = None  # documents.jsonl

    def summary(self) -> str:
        """For stderr."""
        return f"{len(self.markdown)} document(s), {len(self.images)} image(s) written, index: {self.index}"  # fmt: skip


def _markdown(prompt: list, segments: list, links: list[str]) -> str:
    """The prompt, then the continuation (after an HTML comment), images as `links`, in order."""
    images = iter(links)
    parts = []
    for seg in [*prompt, None, *segments]:
        if seg is None:
            parts.append("<!-- generated from here -->")
        else:
            parts.append(seg if isinstance(seg, str) else f"\n\n{next(images)}\n\n")
    return "".join(parts).strip() + "\n"


def continue_to_folder(
    model: str | Path,
    prompts: Sequence[tuple[str, DocumentPrompt]],
    sampling: SamplingConfig,
    out: str | Path,
    max_new_tokens: int = 256,
    max_images: int = 4,
    unconditional: str = "caption_dropped",
) -> DocumentsResult:
    """Continue (where, prompt) pairs (`read_documents`) into `out`: per prompt k a Markdown file
    (`document.md`, or `000.md`, `001.md`, ... for several) with its images inline as PNGs
    (`<k>_<j>.png` generated, `<k>_p<j>.png` the prompt's as the model read them), and
    `documents.jsonl`, one line per prompt: {"file", "prompt", "segments" (the generated ones, in
    the document format), "prompt_tokens", "new_tokens", "images", "stop"}. `unconditional` is
    the CFG branch of every image (`vqgpt.lm.continuation.UNCONDITIONAL_BRANCHES`).

    Any of these names already in `out`: OutputExistsError before anything is drawn.
    """
    out = Path(out)
    md_names = ["document.md"] if len(prompts) == 1 else [f"{k:03d}.md" for k in range(len(prompts))]  # fmt: skip
    taken = [p.name for k in range(len(prompts)) for p in out.glob(f"{k:03d}_*.png")]
    refuse_existing(out, [*md_names, "documents.jsonl", *taken])
    pipe = Pipeline.from_pretrained(model)
    docs = continue_documents(
        pipe, [p for _, p in prompts], sampling, max_new_tokens, max_images, unconditional
    )
    out.mkdir(parents=True, exist_ok=True)
    result = DocumentsResult(index=out / "documents.jsonl")
    lines = []
    for k, ((where, _), doc, md) in enumerate(zip(prompts, docs, md_names, strict=True)):
        shown = [s for s in doc.prompt if isinstance(s, Image.Image)]
        names = [f"{k:03d}_p{j}.png" for j in range(1, len(shown) + 1)]
        links = [f"![prompt image {j}]({name})" for j, name in enumerate(names, start=1)]
        names += [f"{k:03d}_{j}.png" for j in range(1, len(doc.images) + 1)]
        links += [f"![image {j}]({k:03d}_{j}.png)" for j in range(1, len(doc.images) + 1)]
        for image, name in zip([*shown, *doc.images], names, strict=True):
            image.save(out / name)
            result.images.append(out / name)
        write_text(out / md, _markdown(doc.prompt, doc.segments, links))
        result.markdown.append(out / md)
        generated = iter(names[len(shown) :])
        record = {
            "file": md,
            "prompt": where,
            "segments": [
                {"text": s} if isinstance(s, str) else {"image": next(generated)}
                for s in doc.segments
            ],
            "prompt_tokens": doc.prompt_tokens,
            "new_tokens": doc.new_tokens,
            "images": len(doc.images),
            "stop": doc.stop,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_text(result.index, "".join(lines))
    return result
