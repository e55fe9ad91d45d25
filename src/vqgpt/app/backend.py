"""The web app's backend over vqgpt: a run folder, an export folder or a Hub id, decoded by
vqgpt itself (`vqgpt.lm.infer`: the same images and captions as `vqgpt generate` / `caption`).

The app (`vqgpt.export.hub.app_vqgpt`) calls the methods documented there; this class adapts a
loaded `Pipeline` to them. The About tab's scores are the run's `vqgpt eval` metrics (found as
`vqgpt export` finds them), its card the export's README.md or, for a run, the card an export
would carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vqgpt.artifacts import IMAGE_TOKENIZER_DIR, read_json
from vqgpt.data.images import ImageTransform, read_image, to_pil
from vqgpt.export.card import metric_rows, model_card
from vqgpt.export.folder import data_source, find_metrics, find_run_parts
from vqgpt.export.hub.app_vqgpt import CaptionOptions, DrawOptions
from vqgpt.lm.infer import caption_images, decode_codes, generate_images
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.sampling import SamplingConfig


def resolve_model(model: str) -> Path:
    """A local folder as it is; anything else that looks like `org/name` is downloaded from the
    Hub (its snapshot is an export folder, which vqgpt loads as a pipeline)."""
    path = Path(model)
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


@dataclass
class VqgptBackend:
    """A loaded pipeline, as the app's backend."""

    pipe: Pipeline
    model: Path  # what --model named (a run, its final/, an export)

    @classmethod
    def load(cls, model: str) -> VqgptBackend:
        """Resolve and load a pipeline (every file checked first: one-line errors)."""
        path = resolve_model(model)
        return cls(Pipeline.from_pretrained(path), path)

    @property
    def codebook_size(self) -> int:
        return self.pipe.layout.codebook_size

    def describe(self) -> str:
        """One line: image size, grid, codebook, context."""
        size = self.pipe.image_tokenizer.config.arch.image_size
        h, w = self.pipe.layout.grid
        return (
            f"{size}x{size} px images as {h}x{w} codes of {self.codebook_size}, GPT-2 context "
            f"{self.pipe.lm.config.n_positions} tokens; vqgpt"
        )

    def read_image(self, path: str) -> tuple[Image.Image | None, str | None]:
        image, skip = read_image(path)
        return image, None if skip is None else skip.detail

    @torch.no_grad()
    def encode(self, image: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        """(the model's input image, codes [h, w])."""
        transform = ImageTransform(self.pipe.image_tokenizer.config.arch.image_size)
        pixels = transform(image)[None].to(self.pipe.device)  # (1, 3, S, S)
        return to_pil(pixels[0].cpu()), self.pipe.image_tokenizer.encode(pixels)[0].cpu()

    def decode(self, codes: torch.Tensor) -> Image.Image:
        return decode_codes(self.pipe, codes[None])[0]

    def draw(self, prompts: list[str], n: int, opts: DrawOptions) -> list[Image.Image]:
        sampling = SamplingConfig(
            temperature=opts.temperature,
            top_k=opts.top_k,
            cfg_scale=opts.cfg_scale,
            seed=opts.seed,
            rerank=opts.rerank,
        )
        return generate_images(self.pipe, prompts, n, sampling)

    def caption(self, images: list[Image.Image], opts: CaptionOptions) -> list[str]:
        beams = opts.beams if opts.mode == "beam" else 1
        rerank = opts.rerank if opts.mode == "rerank" else 1
        sampling = SamplingConfig(do_sample=False, num_beams=beams, rerank=rerank)
        return caption_images(self.pipe, images, sampling)

    def scores(self) -> list[tuple[str, float]]:
        """The run's `vqgpt eval` scores (none found: [])."""
        metrics = find_metrics(find_run_parts(self.model))
        return [(name, value) for _, _, name, value in metric_rows(metrics)]

    def card(self) -> str:
        """An export's README.md, else the card `vqgpt export` would write for this run."""
        readme = self.pipe.path / "README.md"
        if readme.is_file():
            return readme.read_text(encoding="utf-8")
        parts = find_run_parts(self.model)
        image_config = read_json(self.pipe.path / IMAGE_TOKENIZER_DIR / "config.json")
        name = self.model.resolve().name
        metrics = find_metrics(parts)
        return model_card(
            name, str(self.model), image_config, self.pipe.layout, metrics, data_source(parts)
        )
