"""Config mechanics: YAML <-> dataclass, overrides, unknown keys, presets, every shipped YAML loads."""


import pytest
import yaml

from vqgpt.config import ConfigError, apply_overrides, from_dict, load_config, merge, to_dict
from vqgpt.recipes import packaged_dir
from vqgpt.tokenizer.quantize import QuantizerConfig

CONFIGS = packaged_dir()  # configs/ in a checkout links there


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="quantizer.codebok_size"):
        from_dict(QuantizerConfig, {"codebok_size": 3}, "quantizer")


def test_seed_preset_fills_fields_and_explicit_keys_win():
    seed = from_dict(QuantizerConfig, {"preset": "seed"})
    assert (seed.ema, seed.kmeans_init, seed.restart_after_steps, seed.init) == (
        False,
        False,
        0,
        "uniform",
    )
    explicit = from_dict(QuantizerConfig, {"preset": "seed", "ema": True})
    assert explicit.ema is True and explicit.kmeans_init is False
    # a saved config (all fields + preset) reloads to the same values
    assert from_dict(QuantizerConfig, to_dict(explicit)) == explicit


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"codebook_size": 64}))
    cfg = load_config(QuantizerConfig, path, ["ema_decay=0.9", "codebook_dim=8", "ema=false"])
    assert cfg.codebook_size == 64 and cfg.ema_decay == 0.9 and cfg.codebook_dim == 8
    assert cfg.ema is False
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["nonsense"])


def test_validation_speaks_to_the_user():
    with pytest.raises(ConfigError, match="codebook_size"):
        QuantizerConfig(codebook_size=1)
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(QuantizerConfig, {"codebook_size": "many"})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(QuantizerConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("tokenizer/*.yaml")), ids=lambda p: p.name)
def test_every_tokenizer_recipe_loads(path):
    from vqgpt.tokenizer.train import load_recipe

    recipe = load_recipe(path)
    assert recipe.model.image_size % recipe.model.downsample_factor == 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("accelerate/*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid_yaml(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert data["num_processes"] >= 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("lm/*.yaml")), ids=lambda p: p.name)
def test_every_lm_recipe_loads(path):
    from vqgpt.lm.train import load_lm_recipe

    recipe = load_lm_recipe(path)
    assert recipe.sequences.max_length >= 68  # one 8x8 image + 4 framing tokens at least


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("demo/*.yaml")), ids=lambda p: p.name)
def test_every_demo_config_loads_with_its_recipes(path):
    from vqgpt.demo import load_demo_config
    from vqgpt.lm.train import load_lm_recipe
    from vqgpt.tokenizer.train import load_recipe

    demo = load_demo_config(path)
    assert load_recipe(demo.tokenizer_recipe, patch=demo.tokenizer).train.max_steps > 0
    assert load_lm_recipe(demo.lm_recipe, patch=demo.lm).train.max_steps > 0
    assert demo.eval.num_images >= 1


def test_merge_patches_nested_mappings_and_replaces_the_rest():
    base = {"train": {"max_steps": 10, "betas": [0.9, 0.99]}, "data": {"source": "shapes"}}
    patch = {"train": {"max_steps": 20, "betas": [0.5]}, "eval": {"max_images": 3}}
    assert merge(base, patch) == {
        "train": {"max_steps": 20, "betas": [0.5]},
        "data": {"source": "shapes"},
        "eval": {"max_images": 3},
    }
    assert base["train"]["max_steps"] == 10  # inputs untouched


def test_renamed_quantizer_keys_still_load_with_a_warning(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"levels": 2, "warmup_steps": 5}))
    with pytest.warns(FutureWarning, match="levels is now called num_quantizers"):
        cfg = load_config(QuantizerConfig, path)
    assert (cfg.num_quantizers, cfg.bypass_steps) == (2, 5)
    with pytest.raises(ConfigError, match="give only num_quantizers"):
        from_dict(QuantizerConfig, {"levels": 2, "num_quantizers": 2})
