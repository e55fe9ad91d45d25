"""Folders written by vqgpt 0.1.0 (tests/fixtures/v0.1.0/, before the layout and the renamed
quantizer keys) load with today's code and compute what 0.1.0 computed from them.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgpt.data.images import ImageTransform
from vqgpt.export.folder import ExportConfig, export_run
from vqgpt.lm.generate import generate_captions, generate_image_codes
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.tokenizer.train import load_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "v0.1.0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=8)
# what make.py drew with (0.1.0's defaults for the rest: no top-k / top-p, batch 64, no rerank)
DRAWN = SamplingConfig(seed=3, cfg_scale=2.0, temperature=0.7, top_k=0, top_p=1.0)


@pytest.fixture()
def old(tmp_path) -> Path:
    """A writable copy of the fixture folder."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v0.1.0"))


def pixels(folder: Path, size: int) -> torch.Tensor:
    return ImageTransform(size)(Image.open(folder / "image.png").convert("RGB"))[None]


def test_old_tokenizer_run_loads_silently_and_encodes_the_same(old):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an old config.json is read without complaint
        model = load_tokenizer_model(old / "tokenizer_run")
    quant = model.config.quant
    assert (quant.num_quantizers, quant.bypass_steps, quant.codebook_dim) == (2, 1, 4)
    want = EXPECTED["tokenizer_run"]
    codes = model.encode(pixels(old, 32))
    assert codes.tolist() == want["codes"]  # [1, 8, 8, 2]: two residual quantizers
    recon = float(model.decode(codes).detach().double().sum())
    assert recon == pytest.approx(want["reconstruction_sum"], rel=1e-6)


def test_old_recipe_keys_still_read_with_a_warning(old):
    with pytest.warns(
        FutureWarning, match="quantizer.levels is now called quantizer.num_quantizers"
    ):
        recipe = load_recipe(old / "tokenizer_run" / "config.yaml")
    assert (recipe.quantizer.num_quantizers, recipe.quantizer.bypass_steps) == (2, 1)


@pytest.mark.parametrize("folder", ["lm_run", "lm_export"])
def test_old_pipeline_and_export_load_and_decode_the_same(old, folder):
    pipe = Pipeline.from_pretrained(old / folder)
    want = EXPECTED["lm_run"]
    codes = pipe.image_tokenizer.encode(pixels(old, 32))
    assert codes.tolist() == want["codes"]
    recon = float(pipe.image_tokenizer.decode(codes).double().sum())
    assert recon == pytest.approx(want["reconstruction_sum"], rel=1e-6)
    prompt = pipe.tokenizer.encode_text("a small red circle at the top")
    assert prompt == want["prompt_ids"]
    assert generate_captions(pipe.lm, pipe.layout, codes, GREEDY)[0] == want["caption_ids"]
    drawn = generate_image_codes(pipe.lm, pipe.layout, [prompt], DRAWN)
    assert drawn.tolist() == want["image_codes"]


def test_old_run_exports_with_todays_code_and_loads_without_vqgpt(old, run_without_vqgpt):
    out = old / "new_export"
    export_run(ExportConfig(run=str(old / "lm_run"), out=str(out)))
    config = json.loads((out / "image_tokenizer" / "config.json").read_text())
    assert "levels" not in config["quantizer"] and config["quantizer"]["num_quantizers"] == 1
    code = """
import json, sys
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
root = sys.argv[1]
vq = AutoModel.from_pretrained(root, subfolder="image_tokenizer", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(
    root, subfolder="image_tokenizer", trust_remote_code=True
)
pixels = processor(Image.open(sys.argv[2]))["pixel_values"]
print(json.dumps(vq.encode(pixels).tolist()))
"""
    result = run_without_vqgpt(code, old, str(out), str(old / "image.png"))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == EXPECTED["lm_run"]["codes"]
