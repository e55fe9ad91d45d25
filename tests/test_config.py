"""Config mechanics: YAML <-> dataclass, overrides, unknown keys, presets, every shipped YAML loads."""

from dataclasses import dataclass, field

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


def test_the_stories_recipe_names_stories_the_size_of_its_images():
    from vqgpt.data.stories import StoriesConfig
    from vqgpt.lm.train import load_lm_recipe

    recipe = load_lm_recipe(CONFIGS / "lm" / "stories.yaml")
    documents = recipe.data.documents
    assert documents is not None and documents.source == "shapes_stories"
    stories = from_dict(StoriesConfig, documents.stories, "stories")
    assert stories.image_size == recipe.data.images.shapes.image_size
    assert recipe.sequences.max_length == recipe.model.n_positions >= 384
    assert 0 < recipe.sequences.document_ratio < 1


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


# ---------------------------------------------------------------------------------------------
# a string field takes the text as written; a wrong type names where the value came from


@dataclass
class _Section:
    name: str = ""
    flag: bool = False
    count: int = 0
    ratio: float = 0.0
    names: list[str] = field(default_factory=list)


@dataclass
class _Recipe:
    section: _Section = field(default_factory=_Section)


# YAML 1.1 reads these as booleans, numbers or dates; a str field keeps what the user typed
TEXTS = ["no", "off", "on", "y", "n", "yes", "No", "OFF", "true", "False", "1.10", "010", "1e3"]
TEXTS += ["2024-01-01", "1_000", "0x1F", "12:30", ".5"]


@pytest.mark.parametrize("text", TEXTS)
def test_a_string_field_takes_the_text_as_written_in_a_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(f"section:\n  name: {text}\n  names: [{text}, x]\n")
    cfg = load_config(_Recipe, path)
    assert (cfg.section.name, cfg.section.names) == (text, [text, "x"])


@pytest.mark.parametrize("text", TEXTS)
def test_a_string_field_takes_the_text_as_written_in_an_override(text):
    cfg = load_config(_Recipe, None, [f"section.name={text}", f"section.names=[{text}]"])
    assert (cfg.section.name, cfg.section.names) == (text, [text])


def test_mixed_precision_no_from_an_override_and_a_recipe(tmp_path, tiny_tokenizer_recipe):
    from vqgpt.tokenizer.train import load_recipe

    recipe = tiny_tokenizer_recipe(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("num_threads: 1", "mixed_precision: no"))
    assert load_recipe(path).train.mixed_precision == "no"
    for value in ("no", "bf16"):
        assert load_recipe(path, [f"train.mixed_precision={value}"]).train.mixed_precision == value
    with pytest.raises(ConfigError, match=r"^override 'train.mixed_precision=off': train.mixed"):
        load_recipe(path, ["train.mixed_precision=off", "train.seed=3"])  # checked, and blamed


def test_yaml_12_keeps_booleans_and_numbers_where_they_belong(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("section:\n  flag: TRUE\n  count: 010\n  ratio: 1e-4\n")
    cfg = load_config(_Recipe, path, ["section.ratio=2e-3"])
    assert (cfg.section.flag, cfg.section.count, cfg.section.ratio) == (True, 10, 2e-3)
    # a value the file gave as a number, then replaced by a patch: the text of the file is gone
    cfg = load_config(_Recipe, None, ["section.name=1.10", "section.name=abc"])
    assert cfg.section.name == "abc"


def test_a_wrong_type_in_an_override_names_the_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("section:\n  count: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(_Recipe, path, ["section.count=many"])
    assert str(err.value).startswith("override 'section.count=many': section.count: expected int")
    assert str(path) not in str(err.value)  # the file is not to blame
    with pytest.raises(ConfigError, match=r"^override 'section.flag=yes': .*write true or false"):
        load_config(_Recipe, path, ["section.flag=yes"])
    with pytest.raises(ConfigError, match=r"^override 'section.colour=red': unknown config key"):
        load_config(_Recipe, path, ["section.colour=red"])


def test_a_wrong_type_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("section:\n  count: many\n")
    with pytest.raises(ConfigError, match=rf"^{path}: section.count: expected int, got 'many'"):
        load_config(_Recipe, path, ["section.name=x"])
    path.write_text("section:\n  count: [1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML .*line 3"):
        load_config(_Recipe, path)


def test_an_invalid_value_checked_by_its_section_names_its_source(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("codebook_size: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path} \+ override 'ema=false': .*codebook_size"):
        load_config(QuantizerConfig, path, ["ema=false"])  # the file's value or the override
    path.write_text("ema: true\n")
    with pytest.raises(ConfigError, match=r"^override 'codebook_size=1': .*codebook_size"):
        load_config(QuantizerConfig, path, ["codebook_size=1", "ema=false"])


def test_the_cli_names_a_bad_override_in_one_line(tmp_path, run_cli, tiny_tokenizer_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_tokenizer_recipe(tmp_path / "run")))
    result = run_cli("train-tokenizer", "--config", str(path), "train.batch_size=no", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "vqgpt train-tokenizer: error: override 'train.batch_size=no': train.batch_size: "
        "expected int, got 'no'"
    ]


# ---------------------------------------------------------------------------------------------
# issue 18, second round: booleans for numbers, empty values, duplicate keys, '#', empty files


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("section.count=true", "int, got true"),
        ("section.count=False", "int, got False"),
        ("section.ratio=true", "float, got true"),
        ("section.ratio=FALSE", "float, got FALSE"),
    ],
)
def test_a_boolean_is_no_number_in_an_override(override, shown):
    # True == 1 in Python: train.max_steps=true trained one step
    with pytest.raises(
        ConfigError, match=rf"^override '{override}': section\.\w+: expected {shown}$"
    ):
        load_config(_Recipe, None, [override])


def test_a_boolean_is_no_number_in_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    for text, key in (("count: true", "count"), ("ratio: false", "ratio")):
        path.write_text(f"section:\n  {text}\n")
        with pytest.raises(ConfigError, match=rf"^{path}: section.{key}: expected \w+, got "):
            load_config(_Recipe, path)
    path.write_text("section:\n  names: [a, true]\n")  # a list of str takes the text
    assert load_config(_Recipe, path).section.names == ["a", "true"]


@pytest.mark.parametrize("override", ["section.name=", "section.count=", "section.ratio=~"])
def test_an_empty_override_is_refused_for_a_field_that_cannot_be_none(override):
    with pytest.raises(ConfigError, match=rf"^override '{override}': .*got nothing") as err:
        load_config(_Recipe, None, [override])
    if "name" in override:
        assert "to give an empty text, write ''" in str(err.value)
    assert load_config(_Recipe, None, ["section.name=''"]).section.name == ""


def test_none_in_a_file_is_refused_for_a_field_that_cannot_be_none(tmp_path):
    path = tmp_path / "r.yaml"
    for text in ("section:\n  name:\n", "section:\n  count: null\n", "section:\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{path}: section.*: expected .*, got nothing"):
            load_config(_Recipe, path)
    path.write_text("seed:\n")  # an Optional field takes null
    from vqgpt.lm.sampling import SamplingConfig

    assert load_config(SamplingConfig, path).seed is None


def test_a_key_given_twice_names_the_file_the_key_and_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("section:\n  count: 3\n  name: a\n  count: 5\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}: key section.count is given twice \(lines 2 and 4\)"
    ):
        load_config(_Recipe, path)
    path.write_text("section: {count: 1}\nsection:\n  name: b\n")
    with pytest.raises(ConfigError, match=r"key section is given twice \(lines 1 and 2\)"):
        load_config(_Recipe, path)
    path.write_text("section:\n  names: [{a: 1, a: 2}]\n")
    with pytest.raises(ConfigError, match=r"key section.names\[0\].a is given twice"):
        load_config(_Recipe, path)
    path.write_text("section:\n  count: 3\nother:\n  count: 3\n")  # one key per mapping: fine
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(_Recipe, path)


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("section.name=runs/x #comment", "runs/x #comment"),
        ("section.name=#1", "#1"),
        ("section.name=a # b # c", "a # b # c"),
        ("section.name=a#b", "a#b"),
    ],
)
def test_hash_in_an_override_is_text_not_a_comment(override, value):
    assert load_config(_Recipe, None, [override]).section.name == value


def test_hash_in_an_override_of_a_number_is_a_type_error():
    with pytest.raises(
        ConfigError, match=r"^override 'section.count=5 #x': .*expected int, got '5 #x'"
    ):
        load_config(_Recipe, None, ["section.count=5 #x"])


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n# nothing\n"])
def test_an_empty_recipe_file_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: the recipe holds no settings"):
        load_config(_Recipe, path)


def test_the_cli_refuses_second_round_config_traps_in_one_line(
    tmp_path, run_cli, cli_in_process, tiny_tokenizer_recipe
):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_tokenizer_recipe(tmp_path / "run")))
    cmd = ["train-tokenizer", "--config", str(path)]
    result = run_cli(*cmd, "train.output_dir=", check=False)  # was a TypeError traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "vqgpt train-tokenizer: error: override 'train.output_dir=': train.output_dir: expected "
        "str, got nothing (an empty value or null) (to give an empty text, write '')"
    ]
    dup = tmp_path / "dup.yaml"
    dup.write_text(path.read_text() + "train:\n  max_steps: 1\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# all commented out\n")
    for args, expected in (
        ([*cmd, "train.max_steps=true"], "expected int, got true"),
        (["train-tokenizer", "--config", str(dup)], "key train is given twice"),
        (["train-tokenizer", "--config", str(empty)], "the recipe holds no settings"),
        ([*cmd, "train.log_every="], "train.log_every: expected int, got nothing"),
    ):
        result = cli_in_process(*args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing trained
