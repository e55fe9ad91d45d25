"""Stage-two recipes side by side: train LM variants on one image tokenizer, score each on the
held-out shapes, print a table.

    python scripts/lm_sweep.py --tokenizer runs/demo3/tokenizer --out runs/sweep \
        --variant "base=" --variant "data20k=images=20000" \
        --variant "drop=model.dropout=0.1;train.max_steps=1700"

A variant is `NAME=OVERRIDES`: `;`-separated overrides of --config, plus `images=N` (the number
of training scenes; the 500 test scenes are the same for every N, since a scene depends only on
its seed, split and index). Data, codes and runs go under --out; a finished run is reused.
Columns: training minutes, held-out loss (the split loss, nats per target) of text-to-image image
codes and of captions, greedy caption exact match, and text-to-image "all objects right" for a
single draw and for the best of --rerank draws (self-reranking by the LM's caption likelihood).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from vqgpt.data.shapes import shapes_dataset, write_image_folder
from vqgpt.eval.pipeline import PipelineEvalConfig, evaluate_pipeline
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.train import load_lm_recipe, train_lm
from vqgpt.training import read_metrics


def parse_variant(text: str) -> tuple[str, int | None, list[str]]:
    """`NAME=a=1;b=2;images=N` -> (NAME, N or None, [a=1, b=2])."""
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=OVERRIDES")
    images, overrides = None, []
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        if item.startswith("images="):
            images = int(item.removeprefix("images="))
        else:
            overrides.append(item)
    return name, images, overrides


def shapes_folder(out: Path, shapes, num_images: int) -> Path:
    """Train/test image folders of `num_images` scenes (written once)."""
    folder = out / f"data{num_images}"
    cfg = replace(shapes, num_images=num_images)
    for split in ("train", "test"):
        if not (folder / split / "metadata.jsonl").is_file():
            write_image_folder(shapes_dataset(cfg, split), folder / split)
    return folder


def last_eval(run: Path) -> dict:
    evals, trains = read_metrics(run, "eval"), read_metrics(run, "train")
    out = dict(evals[-1]) if evals else {}
    out["minutes"] = trains[-1]["elapsed_s"] / 60 if trains else float("nan")
    out["steps"] = trains[-1]["step"] if trains else 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a stage-one run folder")
    parser.add_argument("--out", required=True, help="folder for data, codes and runs")
    parser.add_argument("--config", default="configs/lm/shapes.yaml")
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--rerank", type=int, default=8)
    args = parser.parse_args()

    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = []
    for spec in args.variant:
        name, images, overrides = parse_variant(spec)
        base = load_lm_recipe(args.config, overrides)
        n = images or base.data.images.shapes.num_images
        data = shapes_folder(out, base.data.images.shapes, n)
        run = out / name
        recipe = load_lm_recipe(
            args.config,
            overrides
            + [
                f"data.tokenizer={args.tokenizer}",
                f"data.output_dir={out / f'codes{n}'}",
                f"data.images.source={data}",
                f"train.output_dir={run}",
            ],
        )
        start = time.time()
        if not (run / "final" / "model.safetensors").is_file():
            train_lm(recipe, resume="latest")
        trained = time.time() - start
        result = evaluate_pipeline(
            Pipeline.from_pretrained(run, device=device),
            recipe.data.images,
            PipelineEvalConfig(
                num_images=args.eval_images,
                cfg_scales=(args.cfg,),
                temperature=args.temperature,
                rerank=args.rerank,
            ),
        )
        ev = last_eval(run)
        single, best = (result.t2i[k]["accuracy"] for k in result.t2i)
        row = {
            "variant": name,
            "images": n,
            "steps": ev["steps"],
            "train_min": ev["minutes"],
            "t2i_image_loss": ev.get("split/t2i/image", float("nan")),
            "caption_loss": ev.get("split/caption", float("nan")),
            "caption_exact": result.caption["exact_match"],
            "t2i": single,
            "t2i_rerank": best,
            "wall_s": time.time() - start,
            "train_wall_s": trained,
        }
        table.append(row)
        (out / "sweep.jsonl").open("a").write(json.dumps({**row, "overrides": overrides}) + "\n")
        print(json.dumps(row), flush=True)

    print(
        f"\n| variant | images | steps | train min | held-out t2i image loss | caption loss | "
        f"caption exact | t2i cfg {args.cfg:g} | t2i best of {args.rerank} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['variant']} | {r['images']} | {r['steps']} | {r['train_min']:.1f} | "
            f"{r['t2i_image_loss']:.3f} | {r['caption_loss']:.3f} | {r['caption_exact']:.1%} | "
            f"{r['t2i']:.1%} | {r['t2i_rerank']:.1%} |"
        )


if __name__ == "__main__":
    main()
