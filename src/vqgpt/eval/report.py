"""The report of a trained pipeline: held-out scores, generated and captioned grids, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from vqgpt.eval.pipeline import PipelineEvalConfig, evaluate_pipeline
from vqgpt.figures import captioned_grid, plot_curves
from vqgpt.files import write_text
from vqgpt.lm.pipeline import Pipeline
from vqgpt.tokenizer.evaluate import EvalConfig
from vqgpt.training import read_metrics


def t2i_grid_name(scale_name: str) -> str:
    """File of a text-to-image grid: "cfg=1.5" -> "t2i_cfg1_5.png",
    "cfg=1.5, best of 8" -> "t2i_cfg1_5_best_of_8.png"."""
    name = scale_name.replace("=", "").replace(", ", "_").replace(" ", "_").replace(".", "_")
    return f"t2i_{name}.png"


def write_report(
    pipe: Pipeline,
    data,
    folder: Path,
    cfg: PipelineEvalConfig,
    runs: dict[str, Path],
    timings: dict[str, float],
) -> Path:
    """Evaluate, draw the grids and curves, write report.md and metrics.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    result = evaluate_pipeline(pipe, data, cfg, tokenizer_eval=EvalConfig(max_images=500))
    write_text(folder / "metrics.json", json.dumps(result.to_json(), indent=2))

    images, refs, preds = (
        zip(*result.caption_samples, strict=True) if result.caption_samples else ([], [], [])
    )
    captioned_grid(
        list(images),
        [
            f"{'OK' if p.lower() == r.lower() else 'X'} {p}"
            for r, p in zip(refs, preds, strict=True)
        ],
        folder / "captions.png",
        ncol=4,
    )
    grids = {}
    for name, samples in result.t2i_samples.items():
        prompts, drawn, ok = zip(*samples, strict=True)
        path = folder / t2i_grid_name(name)
        captioned_grid(
            list(drawn),
            [f"{'OK' if k else 'X'} {p}" for p, k in zip(prompts, ok, strict=True)],
            path,
            ncol=4,
        )
        grids[name] = path.name
    curves = {}
    for stage, run in runs.items():
        key = "total" if stage == "tokenizer" else "loss"
        series = {key: [(r["step"], r[key]) for r in read_metrics(run, "train") if key in r]}
        if series[key]:
            curves[stage] = plot_curves(
                series, folder / f"loss_{stage}.png", title=f"{stage} training loss"
            ).name

    lines = [
        "# vqgpt demo report",
        "",
        "Held-out data: the `test` split of the built-in shapes (its captions never occur in `train`).",
        "",
        result.markdown(),
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
        "## Text-to-image (held-out captions; OK = the checker finds exactly the prompt's objects)",
        "",
    ]
    for name, file in grids.items():
        lines += [f"### {name}", "", f"![{name}]({file})", ""]
    lines += [
        "## Captioning (held-out images; OK = exact match)",
        "",
        "![captions](captions.png)",
        "",
    ]
    lines += ["## Training curves", ""] + [f"![{k}]({v})" for k, v in curves.items()] + [""]
    write_text(folder / "report.md", "\n".join(lines))
    return folder
