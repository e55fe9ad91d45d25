"""Damaged or incomplete model folders: every loader checks the folder first and names the file.

Through the real CLI (`caption`, `generate`, `reconstruct`, `encode`) on copies of the committed
v0.1.0 runs, each damaged one way: exit status 2, one line on stderr, no traceback, the file (or
folder) named. Then the same damage through each loader in-process, and the manifests' checks
one by one (safetensors headers, JSON, model types, run and checkpoint folders).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file

from vqgpt.artifacts import (
    IMAGE_TOKENIZER,
    PIPELINE,
    DamagedFileError,
    ModelFolderError,
    check_safetensors,
    image_tokenizer_dir,
    pipeline_dir,
)
from vqgpt.export.folder import find_run_parts
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.vocab import JointTokenizer
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.tokenizer.vqvae import VQVAE

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1.0"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def put(path: Path, content: str | bytes) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def edit(path: Path, change: Callable[[dict], object]) -> None:
    """Change the JSON object in `path` in place (`change` mutates it)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_codebook(config: dict, size: int) -> None:
    config["quantizer"]["codebook_size"] = size


def still_training(run: Path) -> Path:
    """The run as it looks mid-training: checkpoints, no final/ yet."""
    shutil.rmtree(run / "final")
    step = run / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (step / "model.safetensors").write_bytes(b"")
    return run


# (id, command, damage: run folder -> the --model to pass, words the one error line holds)
LM_DAMAGE: list[tuple[str, Callable[[Path], Path], str]] = [
    ("lm-weights-missing", lambda r: remove(r / "final/model.safetensors") or r, "model.safetensors is missing"),
    ("lm-config-missing", lambda r: remove(r / "final/config.json") or r, "config.json is missing"),
    ("tokenizer-json-missing", lambda r: remove(r / "final/tokenizer.json") or r, "tokenizer.json is missing"),
    ("lm-weights-truncated", lambda r: truncate(r / "final/model.safetensors") or r, "model.safetensors: damaged weights file"),
    ("lm-weights-garbage", lambda r: put(r / "final/model.safetensors", b"\x00garbage" * 99) or r, "model.safetensors: damaged weights file"),
    ("lm-config-empty", lambda r: put(r / "final/config.json", "") or r, "config.json: the file is empty"),
    ("lm-config-truncated", lambda r: truncate(r / "final/config.json") or r, "config.json: not valid JSON"),
    ("tokenizer-json-truncated", lambda r: truncate(r / "final/tokenizer.json", 0.9) or r, "tokenizer.json: not valid JSON"),
    ("layout-missing", lambda r: remove(r / "final/vqgpt_vocab.json") or r, "vqgpt_vocab.json is missing"),
    ("image-tokenizer-missing", lambda r: remove(r / "final/image_tokenizer") or r, "image_tokenizer/ is missing"),
    ("image-tokenizer-weights-truncated", lambda r: truncate(r / "final/image_tokenizer/model.safetensors") or r, "image_tokenizer/model.safetensors: damaged weights file"),
    ("still-training", still_training, "has no final/ folder yet"),
    ("checkpoint-folder", lambda r: still_training(r) / "checkpoints" / "step_2", "is a training checkpoint"),
    ("no-such-folder", lambda r: r / "nope", "nope: no such folder"),
    ("a-file", lambda r: r / "config.yaml", "config.yaml is a file"),
    ("a-tokenizer-run", lambda r: FIXTURES / "tokenizer_run", "holds an image tokenizer (stage one) only"),
    # config.json that does not fit the weights (issue 18 follow-up): named before transformers
    # builds GPT-2's defaults and prints its load report
    ("lm-config-bare", lambda r: put(r / "final/config.json", '{"model_type": "gpt2"}') or r, "config.json lacks vocab_size, n_positions, n_embd, n_layer, n_head (model.safetensors holds"),
    ("lm-config-positions-only", lambda r: put(r / "final/config.json", '{"model_type":"gpt2","n_positions":128}') or r, "config.json lacks vocab_size, n_embd, n_layer, n_head"),
    ("lm-config-more-layers", lambda r: edit(r / "final/config.json", lambda c: c.update(n_layer=12)) or r, "config.json says n_layer=12, model.safetensors holds n_layer=1"),
    ("lm-config-other-positions", lambda r: edit(r / "final/config.json", lambda c: c.update(n_positions=128)) or r, "says n_positions=128, model.safetensors holds n_positions=96"),
    ("lm-config-other-width", lambda r: edit(r / "final/config.json", lambda c: c.update(n_embd=8, n_head=2)) or r, "says n_embd=8, model.safetensors holds n_embd=4"),
    ("lm-config-inner", lambda r: edit(r / "final/config.json", lambda c: c.update(n_inner=8)) or r, "config.json says n_inner=8 (8 units), model.safetensors holds 16"),
    ("lm-config-n-layer-text", lambda r: edit(r / "final/config.json", lambda c: c.update(n_layer="1")) or r, "n_layer='1' is not a positive integer"),
    ("image-tokenizer-config-other-codebook", lambda r: edit(r / "final/image_tokenizer/config.json", lambda c: set_codebook(c, 32)) or r, "image_tokenizer/config.json does not fit"),
    # optional files are checked when present
    ("generation-config-brace", lambda r: put(r / "final/generation_config.json", "{\n") or r, "generation_config.json: not valid JSON"),
    ("generation-config-list", lambda r: put(r / "final/generation_config.json", "[]") or r, "generation_config.json: expected a JSON object"),
    ("generation-config-empty", lambda r: put(r / "final/generation_config.json", "") or r, "generation_config.json: the file is empty"),
    # the layout's fields are named
    ("layout-empty-object", lambda r: put(r / "final/vqgpt_vocab.json", "{}") or r, "vqgpt_vocab.json: lacks codebook_size, grid"),
    ("layout-without-grid", lambda r: edit(r / "final/vqgpt_vocab.json", lambda c: c.pop("grid")) or r, "vqgpt_vocab.json: lacks grid"),
]  # fmt: skip


def check_one_line(result, words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert words in lines[0], lines[0]


@pytest.mark.parametrize(
    ("damage", "words"), [d[1:] for d in LM_DAMAGE], ids=[d[0] for d in LM_DAMAGE]
)
def test_caption_on_a_damaged_lm_run_is_one_clear_line(
    tmp_path, run_cli, cli_in_process, damage, words
):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    model = damage(run)
    # the three inputs in a real process; the rest in this one (the same main, faster)
    real = damage in [d[1] for d in LM_DAMAGE[:3]]
    cli = run_cli if real else cli_in_process
    result = cli("caption", "--model", str(model), str(FIXTURES / "image.png"), check=False)
    check_one_line(result, words)
    assert result.stdout == ""


def test_a_config_that_does_not_fit_the_weights_is_one_line_in_a_real_process(
    tmp_path, run_cli, cli_in_process
):
    """The issue's input: caption, generate and export on a bare GPT-2 config.json; no load
    report from transformers, no KeyError from the export."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    put(run / "final/config.json", '{"model_type": "gpt2"}')
    words = f"{run / 'final/config.json'} does not fit {run / 'final/model.safetensors'}"
    result = run_cli("caption", "--model", str(run), str(FIXTURES / "image.png"), check=False)
    check_one_line(result, words)
    assert "LOAD REPORT" not in result.stderr
    result = cli_in_process("generate", "--model", str(run), "a red circle", "--out", str(tmp_path / "g"), check=False)  # fmt: skip
    check_one_line(result, words)
    for config in ('{"model_type": "gpt2"}', '{"model_type":"gpt2","n_positions":128}'):
        put(run / "final/config.json", config)
        result = cli_in_process("export", "--run", str(run), "--out", str(tmp_path / "x"), check=False)  # fmt: skip
        check_one_line(result, words)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda r: put(r / "final/generation_config.json", "{"), "generation_config.json: not valid JSON"),
        (lambda r: put(r / "final/image_tokenizer/config.json", '{"model_type": "vqgpt_vqvae"}'), "image_tokenizer/config.json: lacks its 'architecture' section"),
        (lambda r: edit(r / "final/image_tokenizer/config.json", lambda c: c["architecture"].pop("image_size")), "image_tokenizer/config.json: architecture lacks image_size"),
        (lambda r: edit(r / "final/image_tokenizer/config.json", lambda c: set_codebook(c, 32)), "image_tokenizer/config.json does not fit"),
    ],
    ids=["generation-config", "tokenizer-config-bare", "tokenizer-config-no-size", "tokenizer-config-codebook"],
)  # fmt: skip
def test_export_checks_optional_files_and_the_image_tokenizer_config(
    tmp_path, cli_in_process, damage, words
):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    damage(run)
    out = tmp_path / "x"
    check_one_line(cli_in_process("export", "--run", str(run), "--out", str(out), check=False), words)  # fmt: skip
    assert not out.exists()


def test_the_metrics_file_a_user_passes_gets_advice_for_it(tmp_path, cli_in_process):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    bad = tmp_path / "bad.json"
    for content in ('{"caption": {"bleu4": 0.', "", "[1]"):
        bad.write_text(content)
        result = cli_in_process("export", "--run", str(run), "--out", str(tmp_path / "x"), "--metrics", str(bad), check=False)  # fmt: skip
        check_one_line(result, str(bad))
        assert "copy the folder" not in result.stderr
        assert "leave out --metrics" in result.stderr
    (run / "metrics.json").write_text("{")  # found in the run: rewrite it or delete it
    result = cli_in_process("export", "--run", str(run), "--out", str(tmp_path / "x"), check=False)  # fmt: skip
    check_one_line(result, f"{run / 'metrics.json'}: not valid JSON")
    assert "delete it to export without scores" in result.stderr


def test_generate_on_damaged_lm_runs_names_the_file(tmp_path, run_cli, cli_in_process):
    for k, (name, damage, words) in enumerate([LM_DAMAGE[1], LM_DAMAGE[6], LM_DAMAGE[8]]):
        run = tmp_path / name
        shutil.copytree(FIXTURES / "lm_run", run)
        out = tmp_path / f"{name}_out"
        cli = run_cli if k == 0 else cli_in_process  # the first in a real process
        result = cli("generate", "--model", str(damage(run)), "a red circle", "--out", str(out), check=False)  # fmt: skip
        check_one_line(result, words)


TOKENIZER_DAMAGE: list[tuple[str, Callable[[Path], Path], str]] = [
    ("weights-missing", lambda r: remove(r / "final/model.safetensors") or r, "model.safetensors is missing"),
    ("weights-truncated", lambda r: truncate(r / "final/model.safetensors", 0.2) or r, "model.safetensors: damaged weights file"),
    ("config-empty", lambda r: put(r / "final/config.json", " \n") or r, "config.json: the file is empty"),
    ("config-of-another-model", lambda r: put(r / "final/config.json", '{"model_type": "bert"}') or r, "not the config of a vqgpt image tokenizer"),
]  # fmt: skip


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_reconstruct_and_encode_on_damaged_tokenizer_runs(
    tmp_path, run_cli, cli_in_process, command
):
    for k, (name, damage, words) in enumerate(
        TOKENIZER_DAMAGE[: None if command == "reconstruct" else 2]
    ):
        run = tmp_path / name
        shutil.copytree(FIXTURES / "tokenizer_run", run)
        args = [command, "--model", str(damage(run)), str(FIXTURES / "image.png")]
        cli = run_cli if k == 0 else cli_in_process  # the first in a real process
        result = cli(*args, "--out", str(tmp_path / f"{name}_out"), check=False)
        check_one_line(result, words)


# ---------------------------------------------------------------------------------------------
# in-process: every loader, the same checks


def test_every_loader_checks_the_folder_first(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    final = run / "final"
    truncate(final / "model.safetensors")
    with pytest.raises(DamagedFileError, match="final/model.safetensors: damaged"):
        Pipeline.from_pretrained(run)
    with pytest.raises(DamagedFileError, match="final/model.safetensors: damaged"):
        find_run_parts(run)  # the export
    assert image_tokenizer_dir(run) == final / "image_tokenizer"  # the VQ-VAE part is whole

    (final / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFolderError, match="tokenizer_config.json is missing"):
        JointTokenizer.from_pretrained(final)

    truncate(final / "image_tokenizer" / "config.json")
    for load in (
        lambda: load_tokenizer_model(run),
        lambda: load_tokenizer_model(final),
        lambda: VQVAE.load(final / "image_tokenizer"),
    ):
        with pytest.raises(DamagedFileError, match="image_tokenizer/config.json: not valid JSON"):
            load()


def test_weights_of_another_model_are_named(tmp_path):
    """A whole safetensors file that is not this model's: the load report becomes one error."""
    final = tmp_path / "final"
    shutil.copytree(FIXTURES / "lm_run" / "final", final)
    shutil.copy(final / "image_tokenizer/model.safetensors", final / "model.safetensors")
    with pytest.raises(DamagedFileError, match="config.json does not fit .*model.safetensors"):
        Pipeline.from_pretrained(final)


def test_a_folder_that_passes_the_checks_loads_without_a_load_report(tmp_path, capfd):
    """transformers' load report never reaches stderr: its logging is quiet around our load."""
    from vqgpt.lm.pipeline import load_lm

    final = tmp_path / "final"
    shutil.copytree(FIXTURES / "lm_run" / "final", final)
    capfd.readouterr()
    load_lm(final)
    VQVAE.load(final / "image_tokenizer")
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_safetensors_checks(tmp_path):
    import torch

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2)}, str(good))
    check_safetensors(good)
    data = good.read_bytes()
    for name, content, words in [
        ("empty", b"", "too short"),
        ("short", data[:5], "too short"),
        ("header-cut", data[:20], "a header of"),
        ("data-cut", data[:-1], "truncated"),
        ("longer", data + b"\0", "truncated"),
        ("not-json", data[:8] + b"x" * (len(data) - 8), "not JSON"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(DamagedFileError, match=words):
            check_safetensors(path)


def test_manifests_and_folder_resolution(tmp_path):
    assert "image_tokenizer/model.safetensors" in PIPELINE.files
    assert set(IMAGE_TOKENIZER.files) == {"config.json", "model.safetensors"}
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lm_run", run)
    assert pipeline_dir(run) == pipeline_dir(run / "final") == run / "final"
    (run / "final/config.json").write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match="expected a JSON object"):
        pipeline_dir(run)
    (run / "final/config.json").write_text('{"model_type": "vqgpt_vqvae"}')
    with pytest.raises(DamagedFileError, match="not the config of a vqgpt pipeline"):
        pipeline_dir(run)
    (run / "final/config.json").unlink()
    (run / "final/config.json").mkdir()
    with pytest.raises(ModelFolderError, match="config.json is not a file"):
        pipeline_dir(run)
