"""Stage-one training: a real run, a killed run that resumes, a 2-process run with equal codebooks."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from vqgpt import training
from vqgpt.training import TrainConfig, build_accelerator, list_checkpoints, read_metrics


def losses(run) -> dict[int, float]:
    return {r["step"]: r["total"] for r in read_metrics(run, "train")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, run_cli, tiny_tokenizer_recipe, write_yaml):
    """An uninterrupted 6-step run, the reference for resume."""
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = write_yaml(out.parent / "r.yaml", tiny_tokenizer_recipe(out))
    run_cli("train-tokenizer", "--config", str(cfg))
    return out


def test_run_writes_final_model_metrics_grid_and_checkpoints(full_run):
    final = full_run / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    summary = json.loads((final / "eval.json").read_text())
    assert summary["step"] == 6 and 0 < summary["usage"] <= 1 and summary["psnr"] > 5
    assert summary["mixed_precision"] == "no"  # the precision it trained in, for the record
    assert list((full_run / "samples").glob("recon_*.png"))
    assert [p.name for p in list_checkpoints(full_run)] == ["step_2", "step_4", "step_6"]
    assert sorted(losses(full_run)) == [1, 2, 3, 4, 5, 6]


def test_killed_run_resumes_with_the_same_next_step_loss(
    full_run, tmp_path, kill_after_checkpoint, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(out, train=dict(save_every=1)))
    resumed_from = kill_after_checkpoint(["train-tokenizer", "--config", str(cfg)], out)
    assert 2 <= resumed_from < 6, "the kill came too late to test a resume"
    result = run_cli("train-tokenizer", "--config", str(cfg), "--resume", "latest")
    assert "resumed from" in result.stderr
    reference, resumed = losses(full_run), losses(out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # no step logged twice
    for step in range(resumed_from + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step


def test_runs_in_one_process_may_change_precision(tmp_path, monkeypatch):
    # `vqgpt demo` trains the tokenizer, then the LM, in one process, each with its own precision
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    first = build_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="no"))
    assert first.mixed_precision == "no"
    second = build_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="bf16"))
    assert second.mixed_precision == "bf16"


def test_resume_latest_without_checkpoint_starts_fresh(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(out, train=dict(max_steps=2)))
    result = run_cli("train-tokenizer", "--config", str(cfg), "--resume", "latest")
    assert "starting fresh" in result.stderr
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_from_a_checkpoint_at_an_evaluation_step_is_bit_exact(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    """A checkpoint is written before its step's evaluation, and a run resumed from it does not
    evaluate that step again: the evaluation must leave the training RNG (dead-code restarts)
    where it was."""
    train = dict(max_steps=8, save_every=1, keep_checkpoints=8, eval_every=4)
    full, out = tmp_path / "full", tmp_path / "resumed"
    result = run_cli("train-tokenizer", "--config",
            str(write_yaml(tmp_path / "full.yaml", tiny_tokenizer_recipe(full, train=train))))  # fmt: skip
    # issue 18, second round: the eval lines are messages (stderr); stdout stays empty
    assert (
        result.stdout == "" and "step 4: PSNR" in result.stderr and "step 8: PSNR" in result.stderr
    )
    cfg = write_yaml(tmp_path / "resumed.yaml", tiny_tokenizer_recipe(out, train=train))
    run_cli("train-tokenizer", "--config", str(cfg), "--resume", str(full / "checkpoints/step_4"))
    reference, resumed = losses(full), losses(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)

    def sha(run):
        return hashlib.sha256((run / "final" / "model.safetensors").read_bytes()).hexdigest()

    assert sha(out) == sha(full)


def test_a_new_run_into_a_folder_holding_a_run_is_refused(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(out, train=dict(max_steps=2)))
    run_cli("train-tokenizer", "--config", str(cfg))
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli("train-tokenizer", "--config", str(cfg), "train.seed=1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a training run; continue it with --resume latest" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written  # nothing lost


def test_unknown_config_key_fails_with_a_clear_message(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    recipe = tiny_tokenizer_recipe(tmp_path / "run")
    recipe["quantizer"]["codebok_size"] = 8
    cfg = write_yaml(tmp_path / "r.yaml", recipe)
    result = run_cli("train-tokenizer", "--config", str(cfg), check=False)
    assert result.returncode == 2
    assert "quantizer.codebok_size" in result.stderr


def test_muon_for_the_tokenizer_is_refused_in_one_line_before_a_folder_is_made(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(out))
    result = run_cli("train-tokenizer", "--config", str(cfg), "train.optimizer=muon", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.optimizer=muon is for the LM's hidden matrices" in result.stderr
    assert not out.exists()


def test_bypass_steps_train_the_projections_and_leave_the_codebook(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    """The warm-up decodes the quantizer's path without the snapping so that its projections
    train before the first code is drawn; the training loop used to drop their gradients with
    the codebook's, leaving them at their random init. Two bypassed steps, a gradient-trained
    codebook (`seed` preset): the projections move between the steps, the codebook does not."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    quantizer = dict(preset="seed", codebook_dim=4, bypass_steps=3)
    train = dict(max_steps=2, save_every=1)
    recipe = tiny_tokenizer_recipe(out, quantizer=quantizer, train=train)
    run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)))
    step1, step2 = (
        load_file(out / "checkpoints" / f"step_{n}" / "model.safetensors") for n in (1, 2)
    )
    quantizer_keys = [k for k in step1 if k.startswith("quantizer.")]
    projections = [k for k in quantizer_keys if ".proj_" in k]
    codebook = [k for k in quantizer_keys if ".proj_" not in k]
    assert len(projections) == 4 and codebook  # weight and bias, in and out; the embedding
    for key in projections:
        assert not torch.equal(step1[key], step2[key]), key
    for key in codebook:
        assert torch.equal(step1[key], step2[key]), key


def test_the_diversity_weight_decays_over_the_training_steps(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    """quantizer.diversity_decay_steps in the training loop: with one warm-up step and a decay
    over 3, the diversity loss is on at steps 2-4 (logged 1-based) and off after; against the
    constant weight, the same losses until the weight first falls (step 3), other ones from
    then on."""
    runs = {}
    for name, decay in (("constant", 0), ("decay", 3)):
        out = tmp_path / name
        quantizer = dict(bypass_steps=1, diversity_weight=0.5, diversity_temperature=0.05)
        quantizer["diversity_decay_steps"] = decay
        recipe = tiny_tokenizer_recipe(out, quantizer=quantizer, train=dict(save_every=0))
        run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / f"{name}.yaml", recipe)))
        runs[name] = {r["step"]: r for r in read_metrics(out, "train")}
    decay, constant = runs["decay"], runs["constant"]
    assert [s for s in sorted(decay) if "entropy" in decay[s]] == [2, 3, 4]
    assert [s for s in sorted(constant) if "entropy" in constant[s]] == [2, 3, 4, 5, 6]
    for step in (1, 2):
        assert decay[step]["total"] == constant[step]["total"], step
    for step in (3, 4, 5, 6):
        assert decay[step]["total"] != constant[step]["total"], step
