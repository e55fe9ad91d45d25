"""An exported vqgpt pipeline at work with plain transformers: the backend of the export's Space.

Self-contained remote code (imports numpy, PIL, torch, transformers and yaml, a dependency of
transformers): `app.py` (`app_vqgpt.py`) serves it. Decoding is transformers' `generate`,
constrained as the model card's snippet is:

    text to image   eos caption boi -> exactly h*w image tokens (`ConstrainedWarper` masks the
                    rest, then temperature and top-k), CFG by transformers' unbatched guidance
                    against the caption-dropped prompt (the constant each branch's
                    renormalisation adds cancels, so it equals vqgpt's guidance over the allowed
                    ids); best of N keeps the image whose prompt the LM finds most likely
    captions        eos boi codes eoi -> text tokens until eos: greedy, beam search, or the
                    greedy caption + N - 1 samples kept by log p(caption | image) +
                    log p(image | caption) (vqgpt's noisy-channel reranking)

Images are read as vqgpt reads them (EXIF orientation, odd modes to RGB, a pixel limit checked on
the header: VQGPT_MAX_IMAGE_PIXELS, PIL's default when unset, 0 = none).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import yaml
from PIL import Image, UnidentifiedImageError
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
)

try:  # inside vqgpt (vqgpt.export.hub)
    from .image_processing_vqgpt import to_rgb
except ImportError:  # the Space: the export's root copy, beside this file
    from image_processing_vqgpt import to_rgb

EXPORT_FILES = (  # what the Space needs of the export, relative to its folder
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "processing_vqgpt.py",
    "image_tokenizer/config.json",
    "image_tokenizer/model.safetensors",
)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default (Image.MAX_IMAGE_PIXELS)
MAX_PIXELS_ENV = "VQGPT_MAX_IMAGE_PIXELS"
CAPTION_TOKENS = 48  # caption length limit (vqgpt's sampling default)
SAMPLE_TEMPERATURE = 0.5  # the sampled candidates of caption reranking (vqgpt's default)


class ConstrainedWarper(LogitsProcessor):
    """Allow ids [lo, hi) only, renormalised over them; then temperature and top-k (0 = off)."""

    def __init__(self, lo: int, hi: int, temperature: float = 1.0, top_k: int = 0) -> None:
        self.lo, self.hi, self.temperature, self.top_k = lo, hi, temperature, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.lo : self.hi] = True
        scores = scores.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
        scores = scores / self.temperature
        if 0 < self.top_k < self.hi - self.lo:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return scores


def max_image_pixels() -> int | None:
    """The pixel limit: VQGPT_MAX_IMAGE_PIXELS (0 = none), else PIL's default."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    return int(text) or None if text.isdigit() else DEFAULT_MAX_PIXELS


def read_image(path: str | os.PathLike) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why it cannot be read): never raises on bad files."""
    path = Path(path)
    if not path.is_file():
        return None, "missing file"
    if path.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        width, height = image.size
        if limit is not None and width * height > limit:
            return None, (
                f"too large: {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{limit:,} (raise it with the environment variable {MAX_PIXELS_ENV}=<pixels>, "
                "0 = no limit)"
            )
        image.load()
        return to_rgb(image), None
    except UnidentifiedImageError:
        return None, "not an image (no image format recognises the data)"
    except Exception as err:  # PIL raises a zoo of types on bad data
        text = str(err)
        if "truncated" in text or isinstance(err, EOFError):
            return None, f"truncated ({text or 'the data ends early'})"
        return None, f"unreadable ({type(err).__name__}: {text})"


def check_export(folder: Path) -> None:
    """Every file the Space needs is there; else a FileNotFoundError naming the first missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a vqgpt export)")
    for name in EXPORT_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder}: {name} is missing, the export folder is incomplete; copy the whole "
                "folder again or export it again with `vqgpt export`"
            )


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """Pixels [3, S, S] in [-1, 1] -> an RGB image."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte()  # (3, S, S)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


class TransformersBackend:
    """The app's backend (see app_vqgpt.py) over an export folder, with the Auto classes."""

    def __init__(self, folder: Path, vq, processor, lm) -> None:
        self.folder, self.vq, self.processor, self.lm = folder, vq, processor, lm

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TransformersBackend:
        """Load an export folder (every file checked first)."""
        folder = Path(folder)
        check_export(folder)
        vq = AutoModel.from_pretrained(folder, subfolder="image_tokenizer", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        lm = AutoModelForCausalLM.from_pretrained(folder)
        return cls(folder, vq.eval(), processor, lm.eval())

    @property
    def codebook_size(self) -> int:
        return self.processor.codebook_size

    def describe(self) -> str:
        """One line: image size, grid, codebook, context."""
        size = self.vq.config.architecture["image_size"]
        h, w = self.processor.grid
        return (
            f"{size}x{size} px images as {h}x{w} codes of {self.codebook_size}, GPT-2 context "
            f"{self.lm.config.n_positions} tokens; transformers"
        )

    def read_image(self, path: str) -> tuple[Image.Image | None, str | None]:
        return read_image(path)

    @torch.no_grad()
    def encode(self, image: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        """(the model's input image, codes [h, w])."""
        pixels = self.processor.image_processor(image)["pixel_values"]  # (1, 3, S, S)
        return _to_pil(pixels[0]), self.vq.encode(pixels)[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> Image.Image:
        return _to_pil(self.vq.decode(codes[None].long())[0])

    # -- text to image ------------------------------------------------------------------------

    @torch.no_grad()
    def draw(self, prompts: list[str], n: int, opts) -> list[Image.Image]:
        """n images per prompt (prompt-major), each the best of `opts.rerank` when > 1."""
        proc = self.processor
        h, w = proc.grid
        draws = n * max(1, opts.rerank)
        texts = [p for p in prompts for _ in range(draws)]
        inputs = proc(text=texts, task="t2i")  # a too long prompt: ValueError
        extra = {}
        if opts.cfg_scale != 1.0:
            uncond = proc(text=[""] * len(texts), task="t2i")
            extra = dict(
                guidance_scale=opts.cfg_scale,
                negative_prompt_ids=uncond["input_ids"],
                negative_prompt_attention_mask=uncond["attention_mask"],
            )
        torch.manual_seed(opts.seed)
        warper = ConstrainedWarper(proc.image_offset, proc.vocab_size, opts.temperature, opts.top_k)
        out = self.lm.generate(
            **inputs,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_new_tokens=h * w,
            max_new_tokens=h * w,
            logits_processor=LogitsProcessorList([warper]),
            pad_token_id=proc.eos_id,
            **extra,
        )
        codes = proc.decode_image_tokens(out[:, inputs["input_ids"].shape[1] :])  # (P*draws, h, w)
        if draws > n:
            score = self.caption_logprobs(codes, texts)  # (P*draws,)
            keep = []
            for p in range(len(prompts)):
                group = score[p * draws : (p + 1) * draws]
                keep += (p * draws + group.topk(n).indices).tolist()
            codes = codes[keep]
        return [_to_pil(x) for x in self.vq.decode(codes)]

    # -- captions -----------------------------------------------------------------------------

    def _logprobs(self, inputs, start: int, lo: int, hi: int) -> torch.Tensor:
        """Summed log-probs [B] of each row's tokens in [lo, hi) from its position `start` on
        (not counting its left padding), each renormalised over ids [lo, hi)."""
        out = []
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
            ids = ids[mask.bool()][None]  # (1, T): unpadded, so positions are as in training
            logits = self.lm(input_ids=ids).logits[0, :-1]  # (T-1, V): t predicts t + 1
            logp = ConstrainedWarper(lo, hi)(ids, logits)
            target = ids[0, 1:]
            picked = logp.gather(-1, target[:, None])[:, 0]  # (T-1,)
            keep = (target >= lo) & (target < hi)
            keep[: max(0, start - 1)] = False
            out.append(picked.masked_fill(~keep, 0.0).sum())
        return torch.stack(out)

    def caption_logprobs(self, codes: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """log p(text | image) [B]: `eos boi codes eoi text eos`, the text tokens scored."""
        inputs = self.processor(image_codes=codes, text=texts, task="caption")
        start = self.processor.ids.tokens_per_image + 3
        return self._logprobs(inputs, start, 0, self.processor.text_vocab_size)

    def image_logprobs(self, codes: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """log p(image | text) [B]: `eos text boi codes eoi eos`, the image tokens scored."""
        inputs = self.processor(image_codes=codes, text=texts, task="t2i", truncation=True)
        lo, hi = self.processor.image_offset, self.processor.vocab_size
        return self._logprobs(inputs, 0, lo, hi)

    @torch.no_grad()
    def caption(self, images: list[Image.Image], opts) -> list[str]:
        """One caption per image: greedy, beam search, or reranked."""
        proc = self.processor
        codes = torch.stack([self.encode(im)[1] for im in images])  # (B, h, w)
        inputs = proc(image_codes=codes)
        room = self.lm.config.n_positions - inputs["input_ids"].shape[1]
        settings = dict(
            max_new_tokens=max(1, min(CAPTION_TOKENS, room)),
            logits_processor=LogitsProcessorList([ConstrainedWarper(0, proc.text_vocab_size)]),
            eos_token_id=proc.eos_id,
            pad_token_id=proc.eos_id,
        )
        n = inputs["input_ids"].shape[1]
        if opts.mode == "beam":
            out = self.lm.generate(**inputs, do_sample=False, num_beams=opts.beams, **settings)
            return [t.strip() for t in proc.decode_text(out[:, n:])]
        greedy = [t.strip() for t in proc.decode_text(self.lm.generate(**inputs, do_sample=False, **settings)[:, n:])]  # fmt: skip
        if opts.mode != "rerank":
            return greedy
        torch.manual_seed(0)
        warper = ConstrainedWarper(0, proc.text_vocab_size, SAMPLE_TEMPERATURE)
        sampled = self.lm.generate(
            **inputs,
            do_sample=True,
            top_k=0,
            num_return_sequences=opts.rerank - 1,
            **{**settings, "logits_processor": LogitsProcessorList([warper])},
        )
        texts = [t.strip() for t in proc.decode_text(sampled[:, n:])]
        out = []
        for i, first in enumerate(greedy):
            candidates = [first, *texts[i * (opts.rerank - 1) : (i + 1) * (opts.rerank - 1)]]
            repeat = codes[i : i + 1].expand(len(candidates), -1, -1)
            score = self.caption_logprobs(repeat, candidates) + self.image_logprobs(
                repeat, candidates
            )
            out.append(candidates[int(score.argmax())])
        return out

    # -- about --------------------------------------------------------------------------------

    def card(self) -> str:
        """The export's README.md."""
        path = self.folder / "README.md"
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def scores(self) -> list[tuple[str, float]]:
        """(name, value) of the card's model-index results."""
        card = self.card()
        if not card.startswith("---\n"):
            return []
        meta = yaml.safe_load(card[4 : card.find("\n---", 4)]) or {}
        rows = []
        for entry in meta.get("model-index") or []:
            for result in entry.get("results") or []:
                rows += [(m["name"], m["value"]) for m in result.get("metrics") or []]
        return rows
