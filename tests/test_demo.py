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
    # the tokenizer's own 15-minute budget (issue 15: its ceiling reaches 100% there)
    train = recipe.train
    assert (train.max_steps, train.max_minutes, train.mixed_precision) == (4200, 15, "bf16")
    assert recipe.model.base_channels == 32  # the recipe's own value, not patched
    assert (full.eval.rerank, full.eval.caption_rerank, full.eval.num_images) == (16, 8, 200)
    # the sampling knobs the demo does not set are vqgpt's one set of defaults
    assert full.eval.temperature == SamplingConfig().temperature
    assert full.eval.cfg_scales == (1.0, SamplingConfig().cfg_scale)
    assert quick.eval.rerank == 3 and quick.eval.num_images == 16
    lm = load_lm_recipe(quick.lm_recipe, patch=quick.lm)
    assert lm.model.preset == "tiny" and lm.data.images.shapes.num_images == 256


def test_a_copied_demo_config_finds_the_packaged_recipes(tmp_path, repo_root):
    # issue 18, second round: `cp .../configs/demo/quick.yaml my.yaml` then `vqgpt demo --config
    # my.yaml` failed after stage 1 began ("../tokenizer/shapes.yaml does not exist")
    from vqgpt.recipes import packaged_dir

    shipped = packaged_dir()
    for name in ("quick", "full"):
        copy = tmp_path / f"my_{name}.yaml"
        copy.write_text((shipped / "demo" / f"{name}.yaml").read_text())
        cfg = load_demo_config(copy)
        assert Path(cfg.tokenizer_recipe) == shipped / "tokenizer" / "shapes.yaml"
        assert Path(cfg.lm_recipe) == shipped / "lm" / "shapes.yaml"
    # a file of that name beside the demo config wins over the packaged recipe
    (tmp_path / "tokenizer").mkdir()
    mine = tmp_path / "tokenizer" / "shapes.yaml"
    mine.write_text((shipped / "tokenizer" / "shapes.yaml").read_text())
    text = (tmp_path / "my_quick.yaml").read_text()
    (tmp_path / "my_quick.yaml").write_text(
        text.replace("tokenizer/shapes", "tokenizer/shapes.yaml")
    )
    assert Path(load_demo_config(tmp_path / "my_quick.yaml").tokenizer_recipe) == mine
    # from another folder, the beside-file is still found relative to the demo config
    assert (
        Path(load_demo_config(tmp_path / "my_quick.yaml").lm_recipe) == shipped / "lm/shapes.yaml"
    )


def test_a_demo_config_naming_a_missing_recipe_fails_before_stage_1(
    tmp_path, run_cli, cli_in_process
):
    from vqgpt.recipes import packaged_dir

    quick = (packaged_dir() / "demo" / "quick.yaml").read_text()
    cases = {
        "lm_recipe 'lm/nope'": quick.replace("lm_recipe: lm/shapes", "lm_recipe: lm/nope"),
        "tokenizer_recipe '../tokenizer/shapes.yaml'": quick.replace(
            "tokenizer_recipe: tokenizer/shapes", "tokenizer_recipe: ../tokenizer/shapes.yaml"
        ),
        # the recipe exists but does not fit: also before anything runs
        "section tokenizer: train.max_steps: expected int, got true": quick.replace(
            "train: {max_steps: 20,", "train: {max_steps: true,"
        ),
    }
    for i, (expected, text) in enumerate(cases.items()):
        config = tmp_path / f"bad{i}.yaml"
        config.write_text(text)
        out = tmp_path / f"out{i}"
        run = run_cli if i == 0 else cli_in_process  # one case in a real process
        result = run("demo", "--config", str(config), "--out", str(out), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "===" not in result.stderr and not out.exists()  # nothing ran
