"""Hub export: every part loads with plain transformers while vqgpt is unimportable, and matches
vqgpt exactly (pixels, codes, reconstructions, token ids, greedy captions); the card's snippet
runs as written; residual and factorised + l2 tokenizers and every quantizer family (simvq,
fsq, lfq) export too; a failed push is clear.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from vqgpt.data.images import ImageTransform, load_rgb
from vqgpt.export.folder import ExportConfig, ExportError, PushError, export_run
from vqgpt.lm.generate import generate_captions
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.lm.sequences import SequenceConfig, build_caption, build_t2i
from vqgpt.tokenizer.vqvae import VQVAE, VQVAEConfig

PREFIX = 24  # sequences.t2i_prefix_length of the exported LM (`lm_run`, tests/conftest.py)
TEXTS = ["a small red circle", "two <|boi|> squares<|endoftext|> at the top", "é", ""]

# Loads exports with the Auto classes; writes what it computes to each job's .pt file.
CHILD = """
import json, sys
from pathlib import Path
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor,
    AutoTokenizer, LogitsProcessor, LogitsProcessorList)

files, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])


def expect_error(fn, words):
    try:
        fn()
    except ValueError as err:
        assert words in str(err), (words, err)
    else:
        raise SystemExit(f"no error, expected one about {words!r}")


def check_processor_errors(processor):
    codes = torch.zeros(1, *processor.grid, dtype=torch.long)
    expect_error(lambda: processor(image_codes=codes, text="hi"), "give task=")
    expect_error(lambda: processor(text="hi", task="caption"), "needs images")
    image = torch.zeros(40, 40, 3, dtype=torch.uint8)
    expect_error(lambda: processor(images=[image]), "image_tokenizer=")
    expect_error(lambda: processor(image_codes=codes + processor.codebook_size), "must lie in")
    short = [processor.eos_id, processor.boi_id, processor.image_offset]
    expect_error(lambda: processor.decode_image_tokens(short), "holds 1 image tokens")


for root, out, snippet in json.loads(sys.argv[3]):
    vq = AutoModel.from_pretrained(root, subfolder="image_tokenizer", trust_remote_code=True)
    vq.eval()
    alone = AutoModel.from_pretrained(Path(root) / "image_tokenizer", trust_remote_code=True)
    assert type(vq).__module__.startswith("transformers_modules"), type(vq).__module__
    image_processor = AutoImageProcessor.from_pretrained(
        root, subfolder="image_tokenizer", trust_remote_code=True
    )
    pixels = image_processor([Image.open(f) for f in files])["pixel_values"]
    codes = vq.encode(pixels)
    result = {"pixels": pixels, "codes": codes, "recon": vq.decode(codes),
              "recon_alone": alone.eval().decode(codes), "forward": vq(pixels).reconstruction}
    if (Path(root) / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(root, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(root)
        lm = AutoModelForCausalLM.from_pretrained(root).eval()
        assert tokenizer.convert_tokens_to_ids("<|img_00000|>") == processor.image_offset
        check_processor_errors(processor)
        t2i = processor(image_codes=codes, text=texts, task="t2i")
        cap = processor(images=[Image.open(f) for f in files], text=texts, task="caption",
                        image_tokenizer=vq)
        prompt = processor(image_codes=codes)  # captioning prompt
        assert set(cap) == {"input_ids", "attention_mask"}  # what generate takes

        class TextOnly(LogitsProcessor):
            def __call__(self, input_ids, scores):
                allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
                allowed[: processor.text_vocab_size] = True
                return scores.float().masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)

        n = prompt["input_ids"].shape[1]
        generated = lm.generate(**prompt, do_sample=False, max_new_tokens=48,
                                logits_processor=LogitsProcessorList([TextOnly()]),
                                eos_token_id=processor.eos_id, pad_token_id=processor.eos_id)
        generated = generated[:, n:]
        result.update({
            "t2i_ids": t2i["input_ids"], "t2i_mask": t2i["attention_mask"],
            "caption_ids": cap["input_ids"], "caption_mask": cap["attention_mask"],
            "prompt_ids": prompt["input_ids"], "generated": generated,
            "codes_back": processor.decode_image_tokens(t2i["input_ids"]),
            "tokenizer_ids": [tokenizer.encode(t, add_special_tokens=False) for t in texts[:1]],
            "captions": processor.decode_text(generated),
        })
    if snippet:
        exec(snippet, {"__name__": "__main__"})  # the card's snippet, in a fresh namespace
    torch.save(result, out)
"""


def write_images(folder: Path) -> list[Path]:
    """Odd sizes and modes: upscale, downscale, crop, transparency, grayscale, palette."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(rgb).ellipse((4, 4, 20, 20), fill="red")
    rgba = Image.new("RGBA", (50, 37), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((10, 5, 40, 30), fill=(0, 90, 255, 200))
    gray = Image.linear_gradient("L").resize((64, 80))
    palette = rgb.resize((20, 24)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    paths = []
    for i, image in enumerate((rgb, rgba, gray, palette)):
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return paths


def vqgpt_pixels(files: list[Path], size: int) -> torch.Tensor:
    transform = ImageTransform(size, random_crop=False)
    return torch.stack([transform(load_rgb(f)) for f in files])


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def card_parts(folder: Path) -> tuple[dict, str]:
    """(YAML metadata, the usage snippet) of an export's README.md."""
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    return meta, re.search(r"```python\n(.*?)```", text, re.S).group(1)


def run_child(
    run_without_vqgpt, tmp: Path, files: list[Path], texts: list[str], jobs: list[tuple]
) -> tuple[list[dict], str]:
    """CHILD over jobs (export folder, card snippet or ""); each job's results and stdout."""
    outs = [str(tmp / f"child_{i}.pt") for i in range(len(jobs))]
    spec = [(str(root), out, snippet) for (root, snippet), out in zip(jobs, outs, strict=True)]
    paths = json.dumps([str(f) for f in files])
    result = run_without_vqgpt(CHILD, tmp, paths, json.dumps(texts), json.dumps(spec))
    return [torch.load(out, weights_only=False) for out in outs], result.stdout


# ---------------------------------------------------------------------------------------------
# fixtures


# ---------------------------------------------------------------------------------------------
# the full pipeline


def test_exported_pipeline_matches_vqgpt_without_vqgpt(
    exported, lm_run, tmp_path, run_without_vqgpt
):
    _, snippet = card_parts(exported)
    assert repr(str(exported)) in snippet  # the card's usage runs as written, in the same child
    files = write_images(tmp_path / "images")
    [got], stdout = run_child(run_without_vqgpt, tmp_path, files, TEXTS, [(exported, snippet)])
    assert "caption:" in stdout and "drew (32, 32)" in stdout

    pipe = Pipeline.from_pretrained(lm_run)
    vq, layout, tok = pipe.image_tokenizer, pipe.layout, pipe.tokenizer
    pixels = vqgpt_pixels(files, vq.config.arch.image_size)
    assert torch.equal(got["pixels"], pixels)  # resize, crop, RGB conversion, scaling
    codes = vq.encode(pixels)
    assert torch.equal(got["codes"], codes)
    recon = vq.decode(codes)
    for key in ("recon", "recon_alone", "forward"):
        torch.testing.assert_close(got[key], recon, rtol=0, atol=1e-6)

    seq = SequenceConfig(t2i_prefix_length=PREFIX)
    text_ids = [tok.encode_text(t) for t in TEXTS]
    t2i = [build_t2i(c, ids, layout, seq).input_ids for c, ids in zip(codes, text_ids, strict=True)]
    cap = [build_caption(c, i, layout, seq).input_ids for c, i in zip(codes, text_ids, strict=True)]
    assert unpad(got["t2i_ids"], got["t2i_mask"]) == t2i
    assert unpad(got["caption_ids"], got["caption_mask"]) == cap
    assert got["tokenizer_ids"] == text_ids[:1]
    assert torch.equal(got["codes_back"], codes)
    assert got["prompt_ids"].tolist() == [row[: layout.tokens_per_image + 3] for row in cap]

    greedy = generate_captions(pipe.lm, layout, codes, SamplingConfig(do_sample=False))
    hf = [[t for t in row if t != layout.eos_id] for row in got["generated"].tolist()]
    assert hf == greedy
    assert got["captions"] == [tok.decode_text(ids) for ids in greedy]


def test_card_metadata_and_vqgpt_loads_the_export(exported, lm_run):
    meta, _ = card_parts(exported)
    assert meta["library_name"] == "transformers" and "pipeline_tag" not in meta
    assert "vqgpt" in meta["tags"] and "metrics" not in meta  # no eval scores in this run
    # vqgpt takes the export wherever it takes a run folder
    pipe, original = Pipeline.from_pretrained(exported), Pipeline.from_pretrained(lm_run)
    assert pipe.layout == original.layout
    for a, b in zip(pipe.lm.parameters(), original.lm.parameters(), strict=True):
        assert torch.equal(a, b)
    weights = "image_tokenizer/model.safetensors"
    assert (exported / weights).read_bytes() == (lm_run / "final" / weights).read_bytes()


# ---------------------------------------------------------------------------------------------
# tokenizer-only exports: residual, factorised + l2, the quantizer families


def save_tokenizer_run(run: Path, files: list[Path], **sections: dict) -> VQVAE:
    """A tiny VQVAE after one training forward (k-means init, EMA step), saved as a run's final/."""
    arch = dict(image_size=32, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4)
    model = VQVAE(
        VQVAEConfig(
            architecture={**arch, **sections.get("model", {})},
            quantizer=dict(codebook_size=32, **sections.get("quantizer", {})),
        )
    )
    torch.manual_seed(0)
    model.train()(vqgpt_pixels(files, 32))
    model.eval().save_pretrained(run / "final")
    return model


def test_quantizer_variants_and_families_export_with_identical_codes(tmp_path, run_without_vqgpt):
    files = write_images(tmp_path / "images")
    variants = {
        "residual": dict(model=dict(attention=True), quantizer=dict(num_quantizers=2)),
        "factorised_l2": dict(
            model=dict(stem_stride=1), quantizer=dict(codebook_dim=4, l2_normalize=True)
        ),
        # the other quantizer families (quantizer.type), K = 32 each
        "simvq": dict(quantizer=dict(type="simvq", estimator="rotation")),
        "fsq": dict(  # and the decoder without its output norm (model.norm_out)
            model=dict(norm_out=False),
            quantizer=dict(type="fsq", fsq_levels=[4, 4, 2], codebook_dim=3),
        ),
        "lfq": dict(  # and the local encoder (model.local_encoder)
            model=dict(local_encoder=True), quantizer=dict(type="lfq", codebook_dim=5)
        ),
    }
    grids = {"residual": (4, 8, 8, 2), "factorised_l2": (4, 16, 16)}
    models, jobs = {}, []
    for name, sections in variants.items():
        models[name] = save_tokenizer_run(tmp_path / name, files, **sections)
        out = tmp_path / f"{name}_export"
        assert not export_run(ExportConfig(str(tmp_path / name), str(out))).has_lm
        assert not (out / "config.json").exists()  # no LM: image_tokenizer/, code and card
        jobs.append((out, card_parts(out)[1] if name == "residual" else ""))
        family = {"simvq": "(SimVQ: ", "fsq": "(FSQ: ", "lfq": "(LFQ: "}.get(name)
        assert family is None or family in (out / "README.md").read_text(), name
    results, stdout = run_child(run_without_vqgpt, tmp_path, files, [], jobs)
    assert "torch.Size([1, 8, 8, 2]) torch.Size([1, 3, 32, 32])" in stdout  # the card's snippet
    for (name, vq), got in zip(models.items(), results, strict=True):
        codes = vq.encode(vqgpt_pixels(files, 32))
        assert codes.shape == grids.get(name, (4, 8, 8)), name
        assert torch.equal(got["codes"], codes), name
        torch.testing.assert_close(got["recon"], vq.decode(codes), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the card's metrics, pushing, errors


def test_card_metrics_come_from_the_metrics_file_or_the_tokenizer_eval(
    tiny_tokenizer_run, tmp_path
):
    def scores(folder: Path) -> dict[str, float]:
        meta, _ = card_parts(folder)
        results = meta["model-index"][0]["results"]
        return {m["name"]: m["value"] for r in results for m in r["metrics"]}

    out = tmp_path / "export"
    export_run(ExportConfig(str(tiny_tokenizer_run), str(out)))
    held_out = json.loads((tiny_tokenizer_run / "final" / "eval.json").read_text())
    assert scores(out) == {
        "reconstruction PSNR (dB)": round(held_out["psnr"], 4),
        "reconstruction SSIM": round(held_out["ssim"], 4),
        "reconstruction codebook usage": round(held_out["usage"], 4),
    }
    metrics = {
        "caption": {"exact_match": 0.75, "bleu4": 0.5, "n": 16},
        "t2i": {"cfg=1": {"accuracy": 0.25, "n": 16}, "cfg=3": {"accuracy": 0.5, "n": 16}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    export_run(
        ExportConfig(str(tiny_tokenizer_run), str(out), metrics=str(tmp_path / "metrics.json"))
    )
    assert scores(out) == {
        "caption exact match": 0.75,
        "caption BLEU-4": 0.5,
        "text-to-image accuracy (cfg=1)": 0.25,
        "text-to-image accuracy (cfg=3)": 0.5,
    }
    assert card_parts(out)[0]["metrics"] == ["accuracy", "bleu", "exact_match"]
    with pytest.raises(FileNotFoundError, match="--metrics"):
        export_run(ExportConfig(str(tiny_tokenizer_run), str(out), metrics="missing.json"))


def test_push_without_network_fails_clearly_and_keeps_the_export(
    tiny_tokenizer_run, tmp_path, cli_env
):
    env = cli_env()  # a closed local port: the connection is refused at once
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_none")
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "vqgpt.cli", "export", "--run", str(tiny_tokenizer_run)]
    cmd += ["--out", str(out), "--push-to-hub", "someone/tiny", "--private"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cannot reach the Hugging Face Hub" in result.stderr
    assert f"The local export {out} is complete" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "README.md").is_file() and (out / "image_tokenizer/model.safetensors").is_file()


def test_push_passes_repo_privacy_and_branch_to_the_hub(tiny_tokenizer_run, tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.errors

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://hub.example/{repo_id}"

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))
            assert (Path(kw["folder_path"]) / "README.md").is_file()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "e"
    cfg = ExportConfig(str(tiny_tokenizer_run), str(out), "org/m", private=True, revision="v1")
    result = export_run(cfg)
    assert result.url == "https://hub.example/org/m" and not result.has_lm
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True
    assert calls[1][2]["branch"] == "v1" and calls[2][2]["revision"] == "v1"
    assert "path = 'org/m'" in card_parts(out)[1]  # the card points at the repo it is pushed to

    for error, words in [
        (huggingface_hub.errors.LocalTokenNotFoundError("no token"), "hf auth login"),
        (huggingface_hub.errors.OfflineModeIsEnabled("offline"), "cannot reach the Hugging"),
    ]:

        def fail(self, repo_id, error=error, **kw):
            raise error

        monkeypatch.setattr(FakeApi, "create_repo", fail)
        with pytest.raises(PushError, match=words):
            export_run(cfg)
        assert (out / "image_tokenizer" / "model.safetensors").is_file()


def test_export_refuses_non_runs_and_foreign_output_folders(tiny_tokenizer_run, tmp_path):
    with pytest.raises(ExportError, match="not a vqgpt run"):
        export_run(ExportConfig(str(tmp_path), str(tmp_path / "out")))
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier vqgpt export"):
        export_run(ExportConfig(str(tiny_tokenizer_run), str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "export"  # an earlier export is replaced
    for _ in range(2):
        export_run(ExportConfig(str(tiny_tokenizer_run), str(out)))
    assert sorted(os.listdir(out)) == [
        "README.md",
        "configuration_vqgpt.py",
        "image_processing_vqgpt.py",
        "image_tokenizer",
        "modeling_vqgpt.py",
        "quantization_vqgpt.py",
    ]
