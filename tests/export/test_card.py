"""The exported Hub folder as a user meets it, in a process without vqgpt: the card's snippet on
many kinds of image, the processor's output fed to `generate`, typed text that stays text, the
tokenizer's context, and the card's metadata, requirements, scores and file modes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from vqgpt.export.card import hub_dataset_id
from vqgpt.export.folder import ExportConfig, export_run
from vqgpt.lm.vocab import JointTokenizer

# The image the card draws: two lines, replaced by `image = Image.open(path)` per test image.
DRAWN_IMAGE = re.compile(r"^image = Image\.new\(.*\n(ImageDraw\.Draw\(image\).*\n)?", re.M)

# Runs the card's snippet once per image (argv[2]: JSON list of paths) with the image swapped in.
SNIPPET_CHILD = """
import json, sys
snippet, paths = sys.argv[1], json.loads(sys.argv[2])
for path in paths:
    exec(snippet.replace("IMAGE_PATH", repr(path)), {"__name__": "__main__"})
    print("ok", path)
"""

# What a user does besides the snippet: processor output to generate, typed text, the context.
USER_CHILD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

path, texts = sys.argv[1], json.loads(sys.argv[2])
vq = AutoModel.from_pretrained(path, subfolder="image_tokenizer", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
lm = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
image = Image.new("RGB", (64, 64), "white")

inputs = processor(images=image, image_tokenizer=vq)
out = lm.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=processor.eos_id)
batch = processor(images=[image, image.convert("L")], image_tokenizer=vq)
lm.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=processor.eos_id)
t2i = processor(text=texts, task="t2i", truncation=True)
lm.generate(**t2i, max_new_tokens=2, do_sample=False, pad_token_id=processor.eos_id)
try:
    processor(text="word " * 200, task="t2i")
except ValueError as err:
    too_long = str(err)
json.dump({
    "keys": sorted(inputs), "generated": out.shape[1] - inputs["input_ids"].shape[1],
    "typed": [tok(t)["input_ids"] for t in texts],
    "typed_batch": tok(texts, add_special_tokens=False)["input_ids"],
    "t2i": t2i["input_ids"].tolist(), "t2i_mask": t2i["attention_mask"].tolist(),
    "caption_with_text": processor(image_codes=vq.encode(processor.image_processor(image)[
        "pixel_values"]), text=texts[:1], task="caption")["input_ids"].tolist(),
    "model_max_length": tok.model_max_length, "n_positions": lm.config.n_positions,
    "max_caption_tokens": processor.max_caption_tokens, "too_long": too_long,
    "boi": processor.boi_id, "eoi": processor.eoi_id, "image_offset": processor.image_offset,
}, open(sys.argv[3], "w"))
"""

TYPED = ["<|boi|>", "a red <|img_00003|> circle", "<|endoftext|><|eoi|>", "plain words"]


def card(folder: Path) -> tuple[dict, str, str]:
    """(metadata, text, snippet) of an export's README.md."""
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    return meta, text, re.search(r"```python\n(.*?)```", text, re.S).group(1)


def user_images(folder: Path) -> list[Path]:
    """White (the issue's), noise, a photo, 1x1, wide grayscale, transparent, 16-bit."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {
        "white.png": Image.new("RGB", (64, 64), "white"),
        "noise.png": Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)),
        "one_pixel.png": Image.new("RGB", (1, 1), (200, 30, 30)),
        "wide_gray.png": Image.linear_gradient("L").resize((300, 40)),
        "transparent.png": Image.new("RGBA", (37, 90), (0, 0, 0, 0)),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (20, 33), dtype=np.uint16)),
    }
    ImageDraw.Draw(images["transparent.png"]).ellipse((5, 5, 30, 60), fill=(0, 200, 0, 128))
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    try:  # scikit-image (the dev extra) ships photographs
        import skimage

        photo = Path(skimage.__file__).parent / "data" / "coffee.png"
        if photo.is_file():
            paths.append(photo)  # a real photograph, 600x400
    except ImportError:
        pass
    return paths


def chatty(exported: Path, folder: Path, token: int = 2266) -> Path:
    """A copy of the export whose LM says " red" forever (never `<|endoftext|>`): every caption
    runs to the snippet's limit, as a trained model's did for a white image (48 tokens)."""
    shutil.copytree(exported, folder)
    weights = load_file(folder / "model.safetensors")
    wte = weights["transformer.wte.weight"]  # tied to the output layer
    direction = torch.zeros(wte.shape[1])
    direction[0] = 1.0
    wte[token] = direction * 10
    weights["transformer.ln_f.weight"].zero_()  # every position's output is the bias ...
    weights["transformer.ln_f.bias"].copy_(direction * 10)  # ... pointing at `token`
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_card_snippet_runs_on_many_images_without_vqgpt(exported, tmp_path, run_without_vqgpt):
    _, _, snippet = card(exported)
    assert len(DRAWN_IMAGE.findall(snippet)) == 1
    long_captions = chatty(exported, tmp_path / "chatty")
    swapped = DRAWN_IMAGE.sub("image = Image.open(IMAGE_PATH)\n", snippet)
    swapped = swapped.replace(repr(str(exported)), repr(str(long_captions)))
    paths = user_images(tmp_path / "images")
    assert len(paths) >= 6
    result = run_without_vqgpt(SNIPPET_CHILD, tmp_path, swapped, json.dumps(list(map(str, paths))))
    for path in paths:
        assert f"ok {path}" in result.stdout
    assert result.stdout.count("drew (32, 32)") == len(paths)
    captions = re.findall(r"^caption: (.*)$", result.stdout, re.M)
    assert captions == [" red" * 23] * len(paths)  # as long as a t2i prompt takes (prefix 24)
    # the snippet as written too, on the export itself (its own drawn image)
    result = run_without_vqgpt(SNIPPET_CHILD, tmp_path, snippet, "[0]")
    assert "caption:" in result.stdout and "drew (32, 32)" in result.stdout


def test_processor_output_typed_text_and_context_without_vqgpt(
    exported, lm_run, tmp_path, run_without_vqgpt
):
    out = tmp_path / "user.json"
    run_without_vqgpt(USER_CHILD, tmp_path, str(exported), json.dumps(TYPED), str(out))
    got = json.loads(out.read_text())
    assert got["keys"] == ["attention_mask", "input_ids"] and got["generated"] == 3
    # typed text is GPT-2 text, as vqgpt encodes it: no control or image ids
    joint = JointTokenizer.from_pretrained(lm_run / "final")
    expected = [joint.encode_text(t) for t in TYPED]
    assert got["typed"] == got["typed_batch"] == expected
    assert got["typed"][0] == [27, 91, 2127, 72, 91, 29]  # GPT-2's ids of "<|boi|>"
    assert all(max(ids) < joint.layout.eos_id for ids in expected)
    for row, mask in zip(got["t2i"], got["t2i_mask"], strict=True):
        prompt = [i for i, m in zip(row, mask, strict=True) if m]
        assert prompt.count(got["boi"]) == 1 and prompt[-1] == got["boi"]
        assert not any(i >= got["image_offset"] or i == got["eoi"] for i in prompt)
    caption = got["caption_with_text"][0]
    assert caption.count(got["boi"]) == 1 and caption.count(got["eoi"]) == 1
    assert got["model_max_length"] == got["n_positions"] == 160
    assert got["max_caption_tokens"] == 23  # t2i_prefix_length 24 - 1
    assert "pass truncation=True" in got["too_long"]


def test_card_says_what_it_needs_and_promises_no_pipeline(exported):
    meta, text, _ = card(exported)
    assert "pipeline_tag" not in meta and meta["inference"] is False
    assert "alone" not in text
    for package in ("torch", "transformers", "numpy", "Pillow"):
        assert f"`{package}`" in text
    assert "datasets" not in meta  # the built-in shapes are no Hub dataset


@pytest.mark.parametrize(
    ("source", "hub"),
    [
        ("runs/demo/data", None),
        ("./data", None),
        ("/home/me/images", None),
        ("~/images", None),
        ("C:\\data\\images", None),
        ("shapes", None),
        ("photos", None),
        ("mnist", "mnist"),
        ("user/shapes-captions", "user/shapes-captions"),
        ("nlphuji/flickr30k", "nlphuji/flickr30k"),
    ],
)
def test_only_hub_dataset_ids_are_listed_as_datasets(source, hub):
    assert hub_dataset_id(source) == hub


def test_local_folder_here_is_no_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flowers").mkdir()
    assert hub_dataset_id("flowers") is None and hub_dataset_id("tulips") == "tulips"


def test_card_takes_the_reports_scores_and_the_recipes_source(lm_run, tmp_path):
    demo = tmp_path / "demo"  # `vqgpt demo`'s layout: <demo>/lm and <demo>/report/metrics.json
    shutil.copytree(lm_run, demo / "lm")
    recipe = yaml.safe_load((demo / "lm" / "config.yaml").read_text())
    recipe["data"]["images"]["source"] = "runs/demo/data"
    (demo / "lm" / "config.yaml").write_text(yaml.safe_dump(recipe))
    (demo / "report").mkdir()
    metrics = {"caption": {"exact_match": 0.5, "bleu4": 0.25}, "t2i": {"cfg=1": {"accuracy": 0.75}}}
    (demo / "report" / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "export"
    export_run(ExportConfig(str(demo / "lm"), str(out)))
    meta, text, _ = card(out)
    assert "datasets" not in meta  # a local path is no Hub dataset
    assert "a local image folder (`runs/demo/data`" in text
    scores = {
        m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]
    }
    assert scores == {
        "caption exact match": 0.5,
        "caption BLEU-4": 0.25,
        "text-to-image accuracy (cfg=1)": 0.75,
    }
    assert all(r["dataset"]["type"] == "imagefolder" for r in meta["model-index"][0]["results"])
    recipe["data"]["images"]["source"] = "someone/captioned-shapes"
    (demo / "lm" / "config.yaml").write_text(yaml.safe_dump(recipe))
    export_run(ExportConfig(str(demo / "lm"), str(out)))
    meta, _, _ = card(out)
    assert meta["datasets"] == ["someone/captioned-shapes"]


def test_exported_files_are_world_readable(lm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    for path in (run / "final").rglob("*"):
        if path.is_file():
            path.chmod(0o600)  # as safetensors writes its files
    out = tmp_path / "export"
    old = os.umask(0o077)
    try:
        export_run(ExportConfig(str(run), str(out)))
    finally:
        os.umask(old)
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert Path("model.safetensors") in modes and Path("image_tokenizer") in modes
    for path, mode in modes.items():
        assert mode == (0o755 if (out / path).is_dir() else 0o644), (path, oct(mode))
