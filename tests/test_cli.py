"""The command line: one default per sampling knob (the CLI adds none of its own)."""

from __future__ import annotations

from dataclasses import replace

from vqgpt.cli import build_parser, caption_sampling, eval_config, generate_sampling
from vqgpt.eval.pipeline import PipelineEvalConfig
from vqgpt.lm.sampling import SamplingConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_generate_without_options_samples_with_vqgpts_defaults():
    assert generate_sampling(parse("generate", "--model", "m", "--out", "o", "a cat")) == (
        SamplingConfig()
    )
    given = parse("generate", "--model", "m", "--out", "o", "--cfg", "3", "--temperature", "1")
    assert generate_sampling(given) == replace(SamplingConfig(), cfg_scale=3.0, temperature=1.0)
    assert not generate_sampling(
        parse("generate", "--model", "m", "--out", "o", "--greedy")
    ).do_sample


def test_caption_without_options_is_greedy_with_vqgpts_defaults():
    assert caption_sampling(parse("caption", "--model", "m", "x.png")) == replace(
        SamplingConfig(), do_sample=False
    )
    beams = caption_sampling(parse("caption", "--model", "m", "x.png", "--beams", "4"))
    assert beams.num_beams == 4 and beams.temperature == SamplingConfig().temperature


def test_eval_without_options_scores_with_the_same_defaults():
    cfg = eval_config(parse("eval", "--model", "m", "--out", "o"))
    assert cfg == PipelineEvalConfig()
    assert cfg.cfg_scales == (1.0, SamplingConfig().cfg_scale)
    assert cfg.temperature == cfg.caption_temperature == SamplingConfig().temperature
    assert eval_config(parse("eval", "--model", "m", "--out", "o", "--cfg", "2")).cfg_scales == (
        1.0,
        2.0,
    )


def test_a_data_error_is_one_line_and_exit_2(tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml):
    empty = tmp_path / "images"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not a png")
    recipe = tiny_tokenizer_recipe(tmp_path / "run", data=dict(source=str(empty)))
    result = run_cli(
        "train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)), check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vqgpt train-tokenizer: error: no readable images in"), last
