"""A trained pipeline folder: the LM, the joint vocabulary and the stage-one image tokenizer.

Layout of <run>/final/ (everything `from_pretrained` reads, no pickles):

    config.json, model.safetensors, generation_config.json   the GPT-2 (AutoModelForCausalLM)
    tokenizer.json, tokenizer_config.json, vqgpt_vocab.json  the joint vocabulary (AutoTokenizer)
    image_tokenizer/config.json, model.safetensors           the VQ-VAE (VQVAE.from_pretrained)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from vqgpt.artifacts import (
    IMAGE_TOKENIZER_DIR,
    LANGUAGE_MODEL,
    check_loading_info,
    loading,
    pipeline_dir,
)
from vqgpt.lm.model import get_real_vocab_size
from vqgpt.lm.vocab import JointTokenizer, VocabLayout, VocabMismatchError
from vqgpt.tokenizer.vqvae import VQVAE


def save_pipeline(
    final: str | Path, lm: GPT2LMHeadModel, tokenizer: JointTokenizer, image_tokenizer_dir: Path
) -> Path:
    """Write the three parts into `final` via a temporary folder and an atomic rename."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp, model_max_length=lm.config.n_positions)
    (tmp / IMAGE_TOKENIZER_DIR).mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(Path(image_tokenizer_dir) / name, tmp / IMAGE_TOKENIZER_DIR / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def resolve_pipeline_dir(path: str | Path) -> Path:
    """A run folder (uses final/) or a pipeline folder itself, checked to hold every file a
    pipeline needs (`vqgpt.artifacts.PIPELINE`); else a one-line error naming what is wrong."""
    return pipeline_dir(path)


def load_lm(folder: Path, device: str | torch.device = "cpu") -> GPT2LMHeadModel:
    """The GPT-2 of a checked folder; weights that do not fit it are a DamagedFileError."""
    with loading(folder, LANGUAGE_MODEL):
        lm, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    check_loading_info(folder, LANGUAGE_MODEL, info)
    return lm.to(device).eval()


@dataclass
class Pipeline:
    """The loaded parts, checked against each other."""

    lm: GPT2LMHeadModel
    tokenizer: JointTokenizer
    image_tokenizer: VQVAE
    path: Path

    @property
    def layout(self) -> VocabLayout:
        return self.tokenizer.layout

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        """Load a pipeline folder (every file checked first); mismatched parts are a clear error."""
        root = resolve_pipeline_dir(path)
        image_tokenizer = VQVAE.load(root / IMAGE_TOKENIZER_DIR).to(device).eval()
        tokenizer = JointTokenizer.from_pretrained(
            root, codebook_size=image_tokenizer.codebook_size, grid=image_tokenizer.grid
        )
        lm = load_lm(root, device)
        real = get_real_vocab_size(lm.config)
        if real != tokenizer.layout.vocab_size or lm.config.vocab_size < real:
            raise VocabMismatchError(
                f"{root}: the LM has {real} real vocabulary rows but the joint vocabulary has "
                f"{tokenizer.layout.vocab_size} ids: the folder mixes parts of different runs"
            )
        return cls(lm, tokenizer, image_tokenizer, root)
