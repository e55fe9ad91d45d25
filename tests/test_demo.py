"""`vqgpt demo --quick`: every stage end to end, and a second run that reuses finished stages."""

import json
from pathlib import Path

import pytest

from vqgpt.demo import load_demo_config
from vqgpt.eval.report import t2i_grid_name
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.lm.train import load_lm_recipe
from vqgpt.tokenizer.train import load_recipe


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_reuses_stages(tmp_path, run_cli):
    # from a folder outside the checkout: the recipes are package data, the run goes to ./runs/demo
    out = tmp_path / "runs" / "demo"
    run_cli("demo", "--quick", timeout=900, cwd=tmp_path)
    report = out / "report"
    text = (report / "report.md").read_text()
    guided = f"cfg={SamplingConfig().cfg_scale:g}"  # scored beside cfg=1
    reranked = f"{guided}, best of 2"  # the quick demo reranks 2 draws
    assert t2i_grid_name("cfg=1") == "t2i_cfg1.png"
    assert t2i_grid_name("cfg=1.5, best of 8") == "t2i_cfg1_5_best_of_8.png"
    for name in (
        "captions.png",
        "t2i_cfg1.png",
        t2i_grid_name(guided),
        t2i_grid_name(reranked),
        "loss_tokenizer.png",
        "loss_lm.png",
    ):
        assert (report / name).is_file() and f"({name})" in text
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["t2i"]) == {"cfg=1", guided, reranked}
    assert 0.0 <= metrics["caption_reranked"]["exact_match"] <= 1.0
    assert "noisy-channel reranked" in text
    # the checker's score of the true held-out images after encode + decode: the t2i ceiling
    assert 0.0 <= metrics["t2i_ceiling"]["accuracy"] <= 1.0 and metrics["t2i_ceiling"]["n"] == 16
    assert "| ceiling: the true images through the tokenizer |" in text
    assert 0.0 <= metrics["caption"]["exact_match"] <= 1.0
    assert metrics["tokenizer"]["num_images"] > 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # --out: the same run, reused from another folder
    again = run_cli("demo", "--quick", "--out", str(out), timeout=900, cwd=elsewhere)
    assert again.stderr.count("exists: reusing it") == 2


def test_demo_configs_hold_the_demos_settings(repo_root):
    full = load_demo_config(repo_root / "configs" / "demo" / "full.yaml")
    quick = load_demo_config(repo_root / "configs" / "demo" / "quick.yaml", ["eval.rerank=3"])
    shipped = (repo_root / "configs/tokenizer/shapes.yaml").resolve()  # the packaged recipe
    assert Path(full.tokenizer_recipe).resolve() == shipped
    recipe = load_recipe(full.tokenizer_recipe, patch=full.tokenizer)
    assert (recipe.data.shapes.num_images, recipe.data.num_images) == (40000, 10000)
    assert (recipe.train.max_steps, recipe.train.mixed_precision) == (1800, "bf16")
    assert recipe.model.base_channels == 32  # the recipe's own value, not patched
    assert (full.eval.rerank, full.eval.caption_rerank, full.eval.num_images) == (16, 8, 200)
    # the sampling knobs the demo does not set are vqgpt's one set of defaults
    assert full.eval.temperature == SamplingConfig().temperature
    assert full.eval.cfg_scales == (1.0, SamplingConfig().cfg_scale)
    assert quick.eval.rerank == 3 and quick.eval.num_images == 16
    lm = load_lm_recipe(quick.lm_recipe, patch=quick.lm)
    assert lm.model.preset == "tiny" and lm.data.images.shapes.num_images == 256
