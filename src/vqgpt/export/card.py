"""The model card (README.md) of an export: Hub metadata, a usage snippet, the layout, the scores."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from vqgpt.export.hub.configuration_vqgpt import token_grid
from vqgpt.lm.vocab import VocabLayout

BUILT_IN_SOURCES = ("shapes", "photos")
SPACE_GRADIO_VERSION = "6.31.0"  # the Space's gradio (the tested one; the [app] extra: >=6,<7)
SPACE_METADATA = {  # what a Hugging Face Space reads from the card (`vqgpt export` writes app.py)
    "sdk": "gradio",
    "sdk_version": SPACE_GRADIO_VERSION,
    "app_file": "app.py",
    "python_version": "3.11",
}


FAMILY_NAMES = {  # quantizer.type -> how the card names it (vq needs no words)
    "simvq": "SimVQ: a learnt linear map of a frozen random codebook",
    "fsq": "FSQ: finite scalar quantization, K = prod(levels)",
    "lfq": "LFQ: lookup-free sign codes, K = 2^d",
}


def metric_rows(metrics: dict) -> list[tuple[str, str, str, float]]:
    """(task, metric type, name, value) for each score in a metrics record."""
    rows = []
    caption = metrics.get("caption") or {}
    if "exact_match" in caption:
        rows.append(("image-to-text", "exact_match", "caption exact match", caption["exact_match"]))
    if "bleu4" in caption:
        rows.append(("image-to-text", "bleu", "caption BLEU-4", caption["bleu4"]))
    for scale, scores in (metrics.get("t2i") or {}).items():
        if "accuracy" in scores:
            name = f"text-to-image accuracy ({scale})"
            rows.append(("text-to-image", "accuracy", name, scores["accuracy"]))
    tokenizer = metrics.get("tokenizer") or {}
    for key, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("usage", "codebook usage")):
        if key in tokenizer:
            rows.append(("image-feature-extraction", key, f"reconstruction {name}", tokenizer[key]))
    return [(t, k, n, round(float(v), 4)) for t, k, n, v in rows]


HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_dataset_id(source: str | None) -> str | None:
    """`source` when it names a Hub dataset ("name" or "org/name"), else None: the built-in
    sets, local folders (absolute, relative, nested, existing here) and anything else."""
    if source is None or source in BUILT_IN_SOURCES or Path(source).exists():
        return None
    return source if HUB_DATASET_ID.fullmatch(source) and not source.startswith(".") else None


def _metadata(name: str, has_lm: bool, metrics: dict, source: str | None) -> dict:
    tags = ["vqgpt", "vq-vae", "image-tokenizer", "custom_code"]
    if has_lm:
        tags += ["gpt2", "image-to-text", "text-to-image", "multimodal"]
    # no pipeline_tag and no hosted widget: no transformers pipeline() runs this model (the
    # card's snippet does); the Hub would otherwise infer one from config.json
    meta: dict[str, Any] = {"library_name": "transformers", "inference": False, "tags": tags}
    if has_lm:  # the folder is a Space too: app.py serves it with transformers + gradio
        meta.update(SPACE_METADATA, title=name.rsplit("/", 1)[-1][:30])
    dataset_id = hub_dataset_id(source)
    if dataset_id:
        meta["datasets"] = [dataset_id]
    rows = metric_rows(metrics)
    if rows:
        meta["metrics"] = sorted({kind for _, kind, _, _ in rows})
        dataset = {"name": "held-out split", "type": "imagefolder"}
        if dataset_id:
            dataset = {"name": dataset_id, "type": dataset_id}
        elif source == "shapes":
            dataset = {"name": "vqgpt shapes (built-in, test split)", "type": "shapes"}
        results = []
        for task in dict.fromkeys(t for t, _, _, _ in rows):
            scores = [{"type": k, "name": n, "value": v} for t, k, n, v in rows if t == task]
            results.append({"task": {"type": task}, "dataset": dataset, "metrics": scores})
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


_DRAW_IMAGE = """
image = Image.new("RGB", (96, 80), "white")  # any PIL image: here a red disc on white
ImageDraw.Draw(image).ellipse((24, 16, 72, 64), fill="red")
"""

_TOKENIZER_SNIPPET = """import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, AutoModel

path = {path!r}  # this folder, or its Hub repo id
vq = AutoModel.from_pretrained(path, subfolder="image_tokenizer", trust_remote_code=True).eval()
image_processor = AutoImageProcessor.from_pretrained(
    path, subfolder="image_tokenizer", trust_remote_code=True
)
{draw}
pixel_values = image_processor(image)["pixel_values"]  # (1, 3, S, S) in [-1, 1]
codes = vq.encode(pixel_values)  # (1, h, w) code ids
reconstruction = vq.decode(codes)  # (1, 3, S, S) in [-1, 1]
print(codes.shape, reconstruction.shape)
"""

_PIPELINE_SNIPPET = """import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
)

path = {path!r}  # this folder, or its Hub repo id
vq = AutoModel.from_pretrained(path, subfolder="image_tokenizer", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
lm = AutoModelForCausalLM.from_pretrained(path).eval()


class OnlyIds(LogitsProcessor):
    \"\"\"Allow ids [lo, hi) only, renormalised over them (as vqgpt decodes).\"\"\"

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids, scores):
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.lo : self.hi] = True
        return scores.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)

{draw}
# encode: pixels -> codes (1, h, w) -> pixels
pixel_values = processor.image_processor(image)["pixel_values"]  # (1, 3, S, S) in [-1, 1]
codes = vq.encode(pixel_values)
reconstruction = vq.decode(codes)

# caption, greedy: "<|endoftext|> <|boi|> codes <|eoi|>" -> text tokens until <|endoftext|>,
# at most as many as a text-to-image prompt takes (so the caption can be drawn again below)
inputs = processor(images=image, image_tokenizer=vq)  # or processor(image_codes=codes)
prompt_len = inputs["input_ids"].shape[1]
out = lm.generate(
    **inputs,
    do_sample=False,
    max_new_tokens=min(48, processor.max_caption_tokens, lm.config.n_positions - prompt_len),
    logits_processor=LogitsProcessorList([OnlyIds(0, processor.text_vocab_size)]),
    eos_token_id=processor.eos_id,
    pad_token_id=processor.eos_id,
)
caption = processor.decode_text(out[0, prompt_len:])
print("caption:", caption)

# text-to-image: "<|endoftext|> caption <|boi|>" -> exactly h*w image tokens -> pixels
h, w = processor.grid
inputs = processor(text=caption, task="t2i", truncation=True)  # longer text: its first tokens
prompt_len = inputs["input_ids"].shape[1]
torch.manual_seed(0)
out = lm.generate(
    **inputs,
    do_sample=True,
    top_k=0,
    min_new_tokens=h * w,
    max_new_tokens=h * w,
    logits_processor=LogitsProcessorList([OnlyIds(processor.image_offset, processor.vocab_size)]),
    pad_token_id=processor.eos_id,
)
pixels = vq.decode(processor.decode_image_tokens(out[:, prompt_len:]))  # (1, 3, S, S)
drawn = Image.fromarray(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
print("drew", drawn.size)
"""


def usage_snippet(path: str, has_lm: bool) -> str:
    """Python that loads the export with plain transformers, encodes an image (and captions it)."""
    template = _PIPELINE_SNIPPET if has_lm else _TOKENIZER_SNIPPET
    return template.format(path=path, draw=_DRAW_IMAGE)


def model_card(
    name: str,
    path: str,
    image_config: dict,
    layout: VocabLayout | None,
    metrics: dict,
    source: str | None,
) -> str:
    """README.md: YAML metadata, what the folder holds, a usage snippet, layout and scores."""
    has_lm = layout is not None
    meta = yaml.safe_dump(_metadata(name, has_lm, metrics, source), sort_keys=False)
    arch, quant = image_config["architecture"], image_config["quantizer"]
    side = token_grid(arch)[0]
    what = (
        "a VQ-VAE image tokenizer and a GPT-2 over one joint vocabulary of GPT-2 text tokens and "
        "image tokens: it captions images and draws images from captions"
        if has_lm
        else "a VQ-VAE image tokenizer: images to a grid of discrete codes and back"
    )
    codes = f"{side}x{side} codes from a codebook of {quant['codebook_size']}"
    if quant.get("num_quantizers", 1) > 1:
        codes += f" per quantizer, {quant['num_quantizers']} residual quantizers"
    family = quant.get("type", "vq")
    if family != "vq":
        codes += f" ({FAMILY_NAMES[family]})"
    lines = [
        f"---\n{meta}---",
        "",
        f"# {name}",
        "",
        f"A vqgpt export: {what}. Images are "
        f"{arch['image_size']}x{arch['image_size']} pixels, tokenized to {codes}.",
        "It needs `torch`, `transformers`, `numpy` and `Pillow` (`pip install torch transformers "
        "numpy pillow`; the image processor uses Pillow); `trust_remote_code=True` runs the small "
        "modelling files in this repository; vqgpt is not needed. No `transformers.pipeline()` "
        "task runs it: use the snippet below.",
        "",
        "## Usage",
        "",
        "```python",
        usage_snippet(path, has_lm).rstrip(),
        "```",
        "",
        "## Files",
        "",
        "| path | loads with | what |",
        "|---|---|---|",
        "| `image_tokenizer/` | `AutoModel` (remote code) | the VQ-VAE: `encode(pixel_values)` "
        "-> codes, `decode(codes)` -> pixels in [-1, 1] |",
        "| `image_tokenizer/preprocessor_config.json` | `AutoImageProcessor` | shorter side "
        "resized (bicubic, antialiased), centre crop, scaled to [-1, 1] |",
    ]
    if has_lm:
        lines += [
            "| `config.json`, `model.safetensors` | `AutoModelForCausalLM` | the GPT-2 |",
            "| `tokenizer.json` | `AutoTokenizer` | GPT-2 BPE + special + image tokens |",
            "| `processor_config.json` | `AutoProcessor` (remote code) | images / text <-> token "
            "sequences, `decode_text`, `decode_image_tokens` |",
            "",
            "## Token layout",
            "",
            f"- ids 0..{layout.eos_id - 1}: GPT-2 text tokens; {layout.eos_id}: `<|endoftext|>` "
            "(begin, end and padding)",
            f"- {layout.boi_id}, {layout.eoi_id}: `<|boi|>`, `<|eoi|>` (begin / end of image)",
            f"- {layout.image_offset}..{layout.vocab_size - 1}: image code k is id "
            f"{layout.image_offset} + k (codes flattened row-major)",
            "- captioning: `<|endoftext|> <|boi|> codes <|eoi|> caption <|endoftext|>`",
            "- text-to-image: `<|endoftext|> caption <|boi|> codes <|eoi|> <|endoftext|>`",
            "- text you pass to the tokenizer stays text, special-token spellings included "
            '(`split_special_tokens`): `tok("<|endoftext|>")` is GPT-2\'s BPE of those '
            "characters, so a typed caption can never inject control or image tokens. Add them "
            "by id (`tok.eos_token_id`; the processor does), not as `text + tok.eos_token`.",
            "",
            "Decoding must be constrained as in the snippet: text tokens only for captions, "
            "exactly h*w image tokens for images (the embedding is padded past the vocabulary; "
            "those rows are never valid).",
        ]
    if has_lm:
        lines += [
            "",
            "## Web app",
            "",
            "`app.py` serves this folder in the browser (text to image, captions, the code grid "
            "of an image, this card) with transformers and gradio only: `pip install -r "
            "requirements.txt && python app.py`, or push the folder to a Hugging Face Space (the "
            "metadata above makes it one).",
        ]
    rows = metric_rows(metrics)
    if rows:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {n} | {v:g} |" for _, _, n, v in rows]
    if source:
        if source in BUILT_IN_SOURCES:
            data = f"`{source}` (vqgpt's built-in dataset)"
        elif hub_dataset_id(source):
            data = f"the Hub dataset [`{source}`](https://huggingface.co/datasets/{source})"
        else:
            data = f"a local image folder (`{source}` on the machine it was trained on)"
        lines += ["", "## Training data", "", data]
    return "\n".join(lines) + "\n"


__all__ = [
    "BUILT_IN_SOURCES",
    "SPACE_METADATA",
    "hub_dataset_id",
    "metric_rows",
    "model_card",
    "usage_snippet",
]
