"""The harness both stages share: the one optimizer builder; resume from what a killed run left."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch import nn

from vqgpt.artifacts import DamagedFileError, check_checkpoint, checkpoint_files
from vqgpt.files import FileReadError
from vqgpt.tokenizer.vqvae import VQVAE, VQVAEConfig
from vqgpt.training import (
    TrainConfig,
    build_optimizer,
    damaged_checkpoint,
    read_metrics,
    read_trainer_state,
)

ARCH = dict(image_size=16, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4)


def test_both_stages_decay_matrices_and_kernels_only():
    model = VQVAE(VQVAEConfig(architecture=ARCH, quantizer=dict(preset="seed", codebook_size=8)))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, betas=(0.8, 0.9)))
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.8, 0.9)
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            assert id(module.weight) not in decayed and id(module.bias) not in decayed
        if isinstance(module, nn.Conv2d):
            assert id(module.weight) in decayed and id(module.bias) not in decayed
    assert id(model.quantizer.codebooks[0].embed) in decayed  # a gradient-trained codebook
    every = {id(p) for p in model.parameters()}
    assert decayed | {id(p) for p in no_decay["params"]} == every
    gan = build_optimizer(model.decoder, TrainConfig(), betas=(0.5, 0.9))
    assert gan.param_groups[0]["betas"] == (0.5, 0.9)


# ---------------------------------------------------------------------------------------------
# resume reads what a killed run left: a torn last metrics line is dropped, other damage named


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, run_cli, tiny_tokenizer_recipe, write_yaml):
    """A stage-one run stopped at step 2 with checkpoint step_2 (copied by each test)."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    recipe = tiny_tokenizer_recipe(out, train=dict(max_steps=2))
    run_cli("train-tokenizer", "--config", str(write_yaml(out.parent / "r.yaml", recipe)))
    return out


def _copy_run(run: Path, tmp_path: Path, tiny_tokenizer_recipe, write_yaml) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    recipe = tiny_tokenizer_recipe(out, train=dict(max_steps=4))
    return out, write_yaml(tmp_path / "r.yaml", recipe)


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(
    two_step_run, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out, cfg = _copy_run(two_step_run, tmp_path, tiny_tokenizer_recipe, write_yaml)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "kind": "train", "to')  # the write a full disk cut short
    # mixed_precision=no: the text, not YAML 1.1's False (issue 18, fault 3)
    args = ("--config", str(cfg), "--resume", "latest", "train.mixed_precision=no")
    result = run_cli("train-tokenizer", *args)
    assert "resumed from" in result.stderr
    assert f"{out / 'metrics.jsonl'}: the last line is cut short" in result.stderr
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and '"to\n' not in text
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4]


def test_resume_names_a_damaged_metrics_line(
    two_step_run, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out, cfg = _copy_run(two_step_run, tmp_path, tiny_tokenizer_recipe, write_yaml)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[0] = lines[0][:20] + "\n"  # a damaged first line, complete lines after it
    (out / "metrics.jsonl").write_text("".join(lines))
    result = run_cli("train-tokenizer", "--config", str(cfg), "--resume", "latest", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{out / 'metrics.jsonl'}:1: not valid JSON" in result.stderr


def test_resume_names_a_truncated_trainer_state(
    two_step_run, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out, cfg = _copy_run(two_step_run, tmp_path, tiny_tokenizer_recipe, write_yaml)
    state = out / "checkpoints" / "step_2" / "trainer_state.json"
    state.write_text(state.read_text()[:15])
    result = run_cli("train-tokenizer", "--config", str(cfg), "--resume", "latest", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{state}: not valid JSON" in result.stderr and "is damaged" in result.stderr


@pytest.mark.parametrize(
    "text, steps",
    [
        ('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}', [1, 2]),  # no newline
        ('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "tr', [1]),  # torn
        ('{"step": 1, "kind": "train"}\n\0\0\0\0\0\0', [1]),  # power loss: zeros at the end
        ("", []),
    ],
)
def test_read_metrics_keeps_complete_lines_and_drops_a_torn_one(tmp_path, text, steps):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_metrics(tmp_path)] == steps


def test_read_metrics_names_file_and_line_of_other_damage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(FileReadError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)
    path.write_text('{"step": 1}\n["a", "list"]\n')
    with pytest.raises(FileReadError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path)


def test_a_trainer_state_without_its_fields_is_named(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"stp": 3}')
    with pytest.raises(FileReadError, match=r"trainer_state.json does not hold a trainer state"):
        read_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").unlink()
    with pytest.raises(FileReadError, match=r"trainer_state.json is missing"):
        read_trainer_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# a damaged checkpoint: every file Accelerate's load_state reads is checked first, named as the
# damaged trainer_state.json is (issue 18 follow-up)


@pytest.mark.parametrize(
    ("name", "damage", "words"),
    [
        ("model.safetensors", lambda p: _cut(p, 0.5), "model.safetensors: damaged weights file"),
        ("random_states_0.pkl", lambda p: _cut(p, 0.5), "random_states_0.pkl: cut short"),
    ],
    ids=["weights-truncated", "rng-truncated"],
)
def test_resume_from_a_damaged_checkpoint_is_one_line(
    two_step_run, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml, name, damage, words
):
    """The issue's inputs in a real process: a truncated model.safetensors (a traceback before)
    and a truncated RNG state (Accelerate skipped it with a log line: a resume not bit-exact)."""
    out, cfg = _copy_run(two_step_run, tmp_path, tiny_tokenizer_recipe, write_yaml)
    checkpoint = out / "checkpoints" / "step_2"
    damage(checkpoint / name)
    result = run_cli("train-tokenizer", "--config", str(cfg), "--resume", "latest", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{checkpoint / name}" in result.stderr and words in result.stderr
    assert f"the checkpoint {checkpoint} is damaged" in result.stderr


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rng_states(path: Path, **states) -> None:
    import torch

    torch.save(states, path)


CHECKPOINT_DAMAGE = [
    ("optimizer.bin", lambda p: _cut(p, 0.5), "optimizer.bin: cut short or not a torch file"),
    ("optimizer.bin", lambda p: p.write_bytes(b""), "optimizer.bin: cut short or not a torch file"),
    ("scheduler.bin", lambda p: p.unlink(), "scheduler.bin is missing"),
    ("scheduler.bin", lambda p: _cut(p, 0.9), "scheduler.bin: cut short or not a torch file"),
    ("model.safetensors", lambda p: p.unlink(), "model.safetensors is missing"),
    ("model.safetensors", lambda p: p.write_bytes(b"\0" * 64), "model.safetensors: damaged weights"),
    ("random_states_0.pkl", lambda p: p.unlink(), "random_states_0.pkl is missing"),
    ("random_states_0.pkl", lambda p: _rng_states(p, step=2), "lacks the RNG state(s) random_state"),
    ("random_states_0.pkl", lambda p: p.mkdir() if p.unlink() is None else None, "random_states_0.pkl is not a file"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "damage", "words"), CHECKPOINT_DAMAGE, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(CHECKPOINT_DAMAGE)]
)  # fmt: skip
def test_checkpoint_manifest_names_each_damaged_file(two_step_run, tmp_path, name, damage, words):
    checkpoint = tmp_path / "step_2"
    shutil.copytree(two_step_run / "checkpoints" / "step_2", checkpoint)
    files = checkpoint_files(models=1, optimizers=1, schedulers=1, process_index=0)
    assert set(files) == {p.name for p in checkpoint.iterdir()}  # what save_state wrote
    check_checkpoint(checkpoint, files, damaged_checkpoint(checkpoint))  # whole: passes
    damage(checkpoint / name)
    with pytest.raises(DamagedFileError) as err:
        check_checkpoint(checkpoint, files, damaged_checkpoint(checkpoint))
    message = str(err.value)
    assert words in message and str(checkpoint / name) in message
    assert message.endswith(f"{damaged_checkpoint(checkpoint)}") and "\n" not in message


def test_checkpoint_manifest_follows_what_was_prepared():
    assert checkpoint_files(2, 2, 1, process_index=3, custom_objects=1) == (
        "trainer_state.json",
        "model.safetensors",
        "model_1.safetensors",
        "optimizer.bin",
        "optimizer_1.bin",
        "scheduler.bin",
        "random_states_3.pkl",
        "custom_checkpoint_0.pkl",
    )


@pytest.fixture
def cpu_only(monkeypatch):
    """This process as a one-process CPU run, whatever the machine has."""
    from vqgpt import training

    monkeypatch.setattr(training.torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv(training.CPU_BF16_ENV, raising=False)
    return training


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_float32(
    cpu_only, monkeypatch, caplog, native, expected
):
    monkeypatch.setattr(cpu_only, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="vqgpt.training"):
        precision = cpu_only.run_precision(TrainConfig(mixed_precision="bf16"))
    assert precision == expected
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert cpu_only.run_precision(TrainConfig(mixed_precision="no")) == "no"


def test_bf16_on_an_emulating_cpu_is_kept_when_asked(cpu_only, monkeypatch):
    monkeypatch.setattr(cpu_only, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv(cpu_only.CPU_BF16_ENV, "1")
    assert cpu_only.run_precision(TrainConfig(mixed_precision="bf16")) == "bf16"
    accelerator = cpu_only.build_accelerator(
        TrainConfig(output_dir="unused", mixed_precision="bf16")
    )
    assert accelerator.mixed_precision == "bf16"
