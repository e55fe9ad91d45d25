"""`vqgpt demo`: the whole pipeline on the built-in shapes, on this machine, with no network.

Stages (each skipped when its output is complete, so a second run reuses finished work; a stage
killed half-way resumes from its latest checkpoint):
1. data: the shapes train/test splits written as image folders (PNG + metadata.jsonl);
2. tokenizer: stage one (configs/tokenizer/shapes.yaml) trained on that folder;
3. lm: pretokenisation + stage two (configs/lm/shapes.yaml);
4. report: held-out evaluation, generated and captioned grids, loss curves, report.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vqgpt.eval.pipeline import PipelineEvalConfig
from vqgpt.eval.report import write_report
from vqgpt.lm.pipeline import Pipeline

# The full demo fits 30 minutes on 2 CPU cores: the tokenizer gets ~6 of them (colours emerge
# after ~1,300 steps; bf16 autocast is 1.6x faster than float32 on a CPU with AVX512-BF16), the
# LM ~20, data, pretokenisation and the report the rest.
DEMO_TOKENIZER = [
    # 40,000 scenes are written for the LM, which generalises to held-out captions better from
    # them than from 10,000 at the same steps; the tokenizer trains on the first 10,000: the one
    # trained on all 40,000 gave worse LMs (docs/results.md, "Session 3")
    "data.shapes.num_images=40000",
    "data.num_images=10000",
    "train.max_steps=1800",
    "train.max_minutes=9",
    "train.eval_every=0",
    "train.mixed_precision=bf16",
]
QUICK_TOKENIZER = [
    "data.shapes.num_images=256",
    "data.shapes.num_test_images=32",
    "train.max_steps=20",
    "train.eval_every=0",
    "train.save_every=10",
    "eval.max_images=32",
    "model.base_channels=16",
    "quantizer.codebook_size=64",
]
QUICK_LM = [
    "data.images.shapes.num_images=256",
    "data.images.shapes.num_test_images=32",
    "model.preset=tiny",
    "train.max_steps=10",
    "train.eval_every=0",
    "train.save_every=5",
    "eval.max_images=16",
    "eval.baseline_images=64",
]


@dataclass
class DemoConfig:
    """Where the demo writes, which recipes it runs, how much it evaluates."""

    output_dir: str = "runs/demo"
    tokenizer_config: str = "configs/tokenizer/shapes.yaml"
    lm_config: str = "configs/lm/shapes.yaml"
    quick: bool = False  # tiny sizes: a smoke test of every stage in a minute or two
    eval_images: int = 200
    # text-to-image sampling of the report; measured on a 1,200-step LM (docs/results.md): CFG 1.5
    # beat 1 and 3, temperature 0.5 beat 1.0
    cfg_scale: float = 1.5
    temperature: float = 0.5
    # the guided scale is also scored with self-reranking: best of this many drawn images by the
    # LM's own caption likelihood (`SamplingConfig.rerank`); 1 = single draws only
    rerank: int = 16
    # captions are also scored with noisy-channel self-reranking of the greedy caption and 7
    # drawn ones (`SamplingConfig.rerank` for captions); 1 = greedy only
    caption_rerank: int = 8


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage that is not finished yet; returns the report folder."""
    from vqgpt.data.shapes import ShapesConfig, shapes_dataset, write_image_folder
    from vqgpt.lm.train import load_lm_recipe, train_lm
    from vqgpt.tokenizer.train import load_recipe, train_tokenizer

    out = Path(cfg.output_dir)
    for path in (cfg.tokenizer_config, cfg.lm_config):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: recipe not found (run the demo from the repo root)")
    timings: dict[str, float] = {}

    tok_overrides = list(QUICK_TOKENIZER if cfg.quick else DEMO_TOKENIZER)
    tok_recipe = load_recipe(cfg.tokenizer_config, tok_overrides)
    start = _stage("1/4 data: shapes as image folders")
    data_dir = out / "data"
    shapes: ShapesConfig = tok_recipe.data.shapes
    for split in ("train", "test"):
        write_image_folder(shapes_dataset(shapes, split), data_dir / split)
    timings["data"] = time.time() - start

    tok_dir = out / "tokenizer"
    tok_recipe = load_recipe(
        cfg.tokenizer_config,
        tok_overrides + [f"train.output_dir={tok_dir}", f"data.source={data_dir}"],
    )
    start = _stage("2/4 stage one: image tokenizer")
    if (tok_dir / "final" / "model.safetensors").is_file():
        print(f"{tok_dir / 'final'} exists: reusing it")
    else:
        train_tokenizer(tok_recipe, resume="latest")
    timings["tokenizer"] = time.time() - start

    lm_dir = out / "lm"
    lm_recipe = load_lm_recipe(
        cfg.lm_config,
        list(QUICK_LM if cfg.quick else [])
        + [
            f"data.tokenizer={tok_dir}",
            f"data.output_dir={out / 'codes'}",
            f"data.images.source={data_dir}",
            f"train.output_dir={lm_dir}",
        ],
    )
    start = _stage("3/4 stage two: pretokenize + GPT-2")
    if (lm_dir / "final" / "model.safetensors").is_file():
        print(f"{lm_dir / 'final'} exists: reusing it")
    else:
        train_lm(lm_recipe, resume="latest")
    timings["lm"] = time.time() - start

    start = _stage("4/4 evaluation and report")
    report = write_report(
        Pipeline.from_pretrained(lm_dir),
        lm_recipe.data.images,
        out / "report",
        PipelineEvalConfig(
            num_images=16 if cfg.quick else cfg.eval_images,
            cfg_scales=(1.0, cfg.cfg_scale),
            temperature=cfg.temperature,
            rerank=2 if cfg.quick else cfg.rerank,
            caption_rerank=2 if cfg.quick else cfg.caption_rerank,
        ),
        runs={"tokenizer": tok_dir, "lm": lm_dir},
        timings=timings,
    )
    timings["report"] = time.time() - start
    print(f"\nreport: {report / 'report.md'}")
    return report
