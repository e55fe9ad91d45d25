"""The recipes ship inside the package: one copy, read through importlib.resources, found from
any folder; `--config` takes a file, else the packaged recipe it names."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from vqgpt.config import ConfigError, load_config, parse_yaml
from vqgpt.demo import DEMO_CONFIGS, DemoConfig, load_demo_config
from vqgpt.recipes import find_config, packaged_dir, packaged_recipe, packaged_recipes

KINDS = ("accelerate", "demo", "lm", "tokenizer")


def _walk(node, prefix=""):
    for child in node.iterdir():
        if child.is_dir():
            yield from _walk(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".yaml"):
            yield f"{prefix}{child.name}", child


def test_every_packaged_recipe_reads_through_importlib_resources():
    found = dict(_walk(resources.files("vqgpt").joinpath("configs")))
    assert {name.split("/")[0] for name in found} == set(KINDS)
    assert sorted(found) == packaged_recipes()
    for name, node in found.items():
        data = parse_yaml(node.read_text(encoding="utf-8"), name).data
        assert isinstance(data, dict) and data, name


def test_pyproject_package_data_holds_every_recipe(repo_root):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["vqgpt"]
    for name in packaged_recipes():
        assert any(fnmatch.fnmatch(f"configs/{name}", p) for p in patterns), name


def test_the_checkout_configs_folder_is_a_link_to_the_packaged_one(repo_root):
    link = repo_root / "configs"
    assert link.is_symlink(), "configs/ must link to src/vqgpt/configs (one copy of each recipe)"
    assert link.resolve() == (repo_root / "src" / "vqgpt" / "configs").resolve()
    if Path(str(resources.files("vqgpt"))).resolve().is_relative_to(repo_root.resolve()):
        assert packaged_dir().resolve() == link.resolve()


@pytest.mark.parametrize(
    "name", ["configs/lm/shapes.yaml", "lm/shapes.yaml", "lm/shapes", "configs/lm/shapes"]
)
def test_a_config_name_finds_the_packaged_recipe_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert find_config(name) == packaged_dir() / "lm" / "shapes.yaml"


def test_a_file_in_the_current_folder_wins_over_the_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "lm" / "shapes.yaml"
    mine.parent.mkdir()
    mine.write_text("output_dir: mine\n")
    assert find_config("lm/shapes.yaml") == Path("lm/shapes.yaml")
    assert load_config(DemoConfig, "lm/shapes.yaml").output_dir == "mine"
    assert find_config(mine) == mine  # any path
    assert packaged_recipe("../lm/shapes.yaml") is None and packaged_recipe(mine) is None


def test_an_unknown_config_lists_the_packaged_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"lm/shape.yaml does not exist.*lm/shapes.yaml"):
        load_config(DemoConfig, "lm/shape.yaml")


@pytest.mark.parametrize("kind", sorted(DEMO_CONFIGS))
def test_the_demo_resolves_its_recipes_from_an_empty_folder(tmp_path, monkeypatch, kind):
    from vqgpt.lm.train import load_lm_recipe
    from vqgpt.tokenizer.train import load_recipe

    monkeypatch.chdir(tmp_path)
    cfg = load_demo_config(DEMO_CONFIGS[kind])
    assert Path(cfg.tokenizer_recipe).resolve() == (packaged_dir() / "tokenizer/shapes.yaml")
    assert Path(cfg.lm_recipe).resolve() == (packaged_dir() / "lm/shapes.yaml")
    assert load_recipe(cfg.tokenizer_recipe, patch=cfg.tokenizer).train.max_steps > 0
    assert load_lm_recipe(cfg.lm_recipe, patch=cfg.lm).train.max_steps > 0
    assert cfg.output_dir == "runs/demo"  # under the current folder
    assert list(tmp_path.iterdir()) == []  # nothing written by loading


def test_a_demo_config_of_ones_own_may_name_packaged_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_demo.yaml").write_text("tokenizer_recipe: tokenizer/shapes_seed\n")
    cfg = load_demo_config("my_demo.yaml")
    assert find_config(cfg.tokenizer_recipe) == packaged_dir() / "tokenizer/shapes_seed.yaml"
    assert Path(cfg.lm_recipe).resolve() == packaged_dir() / "lm/shapes.yaml"


def test_python_m_vqgpt_recipes_prints_paths_for_accelerate(tmp_path, cli_env):
    cmd = [sys.executable, "-m", "vqgpt.recipes", "accelerate/cpu_2proc.yaml"]
    result = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == packaged_dir() / "accelerate" / "cpu_2proc.yaml"
    result = subprocess.run(
        [*cmd[:3], "nope"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 2 and "no such packaged recipe" in result.stderr
