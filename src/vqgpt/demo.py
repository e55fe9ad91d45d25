"""`vqgpt demo`: the whole pipeline on the built-in shapes, on this machine, with no network.

Stages (each skipped when its output is complete, so a second run reuses finished work; a stage
killed half-way resumes from its latest checkpoint):
1. data: the shapes train/test splits written as image folders (PNG + metadata.jsonl);
2. tokenizer: stage one (the packaged recipe tokenizer/shapes.yaml) trained on that folder;
3. lm: pretokenisation + stage two (lm/shapes.yaml);
4. report: held-out evaluation, generated and captioned grids, loss curves, report.md.

What each stage changes in its recipe, and the report's evaluation, are a `DemoConfig` in
demo/full.yaml (`vqgpt demo`) and demo/quick.yaml (`vqgpt demo --quick`): recipes shipped
inside the package (vqgpt/configs/, `configs/` in a checkout), so the demo runs from any folder
and writes under ./runs/demo (or `--out`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqgpt.config import ConfigError, load_config, merge
from vqgpt.eval.pipeline import PipelineEvalConfig
from vqgpt.eval.report import write_report
from vqgpt.lm.pipeline import Pipeline
from vqgpt.recipes import find_config, find_nested, packaged_recipes

DEMO_CONFIGS = {"full": "demo/full.yaml", "quick": "demo/quick.yaml"}  # packaged recipes


@dataclass
class DemoConfig:
    """Where the demo writes, which recipes it runs with which changes, how it evaluates."""

    output_dir: str = "runs/demo"
    tokenizer_recipe: str = "tokenizer/shapes"  # beside the demo config, else packaged
    tokenizer: dict[str, Any] = field(default_factory=dict)  # partial recipe, merged over it
    lm_recipe: str = "lm/shapes"
    lm: dict[str, Any] = field(default_factory=dict)
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    source: str = field(default="", init=False)  # the demo config file (for errors)


def load_demo_config(path: str | Path, overrides: list[str] | None = None) -> DemoConfig:
    """Read a demo config (a file, else a packaged one: `vqgpt.recipes.find_config`).

    A recipe named in it (`tokenizer_recipe`, `lm_recipe`) is the file of that path relative to
    the demo config's folder when one exists there, else the packaged recipe of that name
    (`vqgpt.recipes.find_nested`): a packaged demo config copied anywhere and edited still runs.
    Raises ConfigError when the demo config does not exist or does not fit DemoConfig, or when
    a recipe it names is neither (before anything runs).
    """
    cfg = load_config(DemoConfig, path, overrides)
    found_config = find_config(path)
    cfg.source = str(found_config or path)
    folder = (found_config or Path(path)).parent
    for name in ("tokenizer_recipe", "lm_recipe"):
        given = getattr(cfg, name)
        found = find_nested(given, folder)
        if found is None:
            raise ConfigError(
                f"{found_config or path}: {name} {given!r} is neither a file beside it "
                f"({folder / given}) nor a packaged recipe (packaged: "
                f"{', '.join(packaged_recipes())})",
                key=name,
            )
        setattr(cfg, name, str(found))
    return cfg


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage that is not finished yet; returns the report folder."""
    from vqgpt.data.shapes import ShapesConfig, shapes_dataset, write_image_folder
    from vqgpt.lm.train import load_lm_recipe, train_lm
    from vqgpt.tokenizer.train import load_recipe, train_tokenizer

    out = Path(cfg.output_dir)
    timings: dict[str, float] = {}
    data_dir, tok_dir, lm_dir = out / "data", out / "tokenizer", out / "lm"

    # both recipes are read before anything runs: a bad one stops the demo before stage 1
    source = cfg.source or "the demo config"
    tok_from, lm_from = f"{source}, section tokenizer", f"{source}, section lm"
    shapes: ShapesConfig = load_recipe(
        cfg.tokenizer_recipe, patch=cfg.tokenizer, patch_source=tok_from
    ).data.shapes
    here = {"train": {"output_dir": str(tok_dir)}, "data": {"source": str(data_dir)}}
    tok_recipe = load_recipe(
        cfg.tokenizer_recipe, patch=merge(cfg.tokenizer, here), patch_source=tok_from
    )
    here = {
        "data": {
            "tokenizer": str(tok_dir),
            "output_dir": str(out / "codes"),
            "images": {"source": str(data_dir)},
        },
        "train": {"output_dir": str(lm_dir)},
    }
    lm_recipe = load_lm_recipe(cfg.lm_recipe, patch=merge(cfg.lm, here), patch_source=lm_from)

    start = _stage("1/4 data: shapes as image folders")
    for split in ("train", "test"):
        write_image_folder(shapes_dataset(shapes, split), data_dir / split)
    timings["data"] = time.time() - start

    start = _stage("2/4 stage one: image tokenizer")
    if (tok_dir / "final" / "model.safetensors").is_file():
        print(f"{tok_dir / 'final'} exists: reusing it", file=sys.stderr)
    else:
        train_tokenizer(tok_recipe, resume="latest")
    timings["tokenizer"] = time.time() - start

    start = _stage("3/4 stage two: pretokenize + GPT-2")
    if (lm_dir / "final" / "model.safetensors").is_file():
        print(f"{lm_dir / 'final'} exists: reusing it", file=sys.stderr)
    else:
        train_lm(lm_recipe, resume="latest")
    timings["lm"] = time.time() - start

    start = _stage("4/4 evaluation and report")
    report = write_report(
        Pipeline.from_pretrained(lm_dir),
        lm_recipe.data.images,
        out / "report",
        cfg.eval,
        runs={"tokenizer": tok_dir, "lm": lm_dir},
        timings=timings,
    )
    timings["report"] = time.time() - start
    print(f"\nreport: {report / 'report.md'}", file=sys.stderr)
    return report
