"""N processes train like one (docs/design.md, "Several processes"), in both stages.

Each comparison runs the real CLI: one process with the global batch, then two processes (gloo)
with the same recipe; the LR at every optimizer step must be equal and the logged losses equal up
to reduction order. Plus: parameters a step leaves unused never crash, a checkpoint resumes
bit-exactly in one and in two processes, another process count is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vqgpt.lm.pipeline import Pipeline
from vqgpt.training import read_metrics

pytestmark = pytest.mark.slow


def curve(run: Path, key: str) -> dict[int, tuple[float, float]]:
    """step -> (lr, key) from a run's metrics.jsonl."""
    return {r["step"]: (r["lr"], r[key]) for r in read_metrics(run, "train")}


def assert_same_training(
    one: Path, other: Path, key: str, rel: float, drift_after: int | None = None
) -> None:
    """The same LR at every step, exactly, and `key` within `rel`; past step `drift_after`,
    within 2e-3 (the reduction order's last-bit differences, grown by Adam's first steps)."""
    a, b = curve(one, key), curve(other, key)
    assert sorted(a) == sorted(b) and a
    for step in a:
        assert b[step][0] == a[step][0], f"lr at step {step}: {b[step][0]} vs {a[step][0]}"
        tol = rel if drift_after is None or step <= drift_after else 2e-3
        assert b[step][1] == pytest.approx(a[step][1], rel=tol), f"{key} at step {step}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(run: Path) -> dict:
    return json.loads((run / "final" / "eval.json").read_text())


# ---------------------------------------------------------------------------------------------
# stage one


TOKENIZER_TRAIN = dict(max_steps=12, save_every=2, keep_checkpoints=6)
TOKENIZER_QUANTIZER = dict(estimator="rotation")


@pytest.fixture(scope="module")
def full_tokenizer_runs(
    tmp_path_factory, run_cli, tiny_tokenizer_recipe, write_yaml, new_accelerate_launcher
) -> dict[int, Path]:
    """processes -> a run of the tiny recipe (global batch 8: 8 steps an epoch; warm-up 2,
    dead-code restarts every 2 unused steps), 12 steps, a checkpoint every 2: the runs that the
    two-process comparison, the resumes and the refusal share (a launch costs ~10-15 s). With
    the rotation trick, the shipped shapes recipe's estimator (the other two-process tests keep
    the straight-through default)."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"tok{processes}") / "full"
        recipe = tiny_tokenizer_recipe(out, train=TOKENIZER_TRAIN, quantizer=TOKENIZER_QUANTIZER)
        launcher = new_accelerate_launcher() if processes == 2 else None
        run_cli("train-tokenizer", "--config", str(write_yaml(out.parent / "full.yaml", recipe)),
                launcher=launcher)  # fmt: skip
        runs[processes] = out
    return runs


def test_tokenizer_in_two_processes_trains_like_one(full_tokenizer_runs):
    one, out = full_tokenizer_runs[1], full_tokenizer_runs[2]
    info = summary(out)
    assert (info["num_processes"], info["replica_max_abs_diff"]) == (2, 0.0)
    # the LR schedule of one process (it ran 2x too fast with two), and the same losses: same
    # batches, k-means and restarts on every rank's rows, global means logged. Measured
    # (2026-12-02, with the straight-through estimator; the rotation trick passes the same
    # bounds): relative gaps <= 6.3e-6 over steps 1-6, then 1.5e-4, -8e-5, -2.7e-6, 3.0e-4,
    # -3.3e-4, -1.9e-4 (steps 7-12): rounding grown by the updates, not another batch or restart
    # (those move the loss by percents)
    assert_same_training(one, out, "total", rel=1e-4, drift_after=6)
    lrs = [lr for lr, _ in curve(out, "total").values()]
    assert lrs[:2] == [lrs[0], lrs[0]] and lrs[2] < lrs[1]  # warm-up 2 steps, then cosine


def test_streamed_shards_in_two_processes_train_like_one(
    tmp_path, repo_root, run_cli, tiny_tokenizer_recipe, write_yaml, accelerate_launcher
):
    """A stream has no sampler to split: rank 0 reads it and sends each rank its slice of the
    global batch (Accelerate's dispatch_batches), so the batches are those of one process."""
    shards = repo_root / "tests/fixtures/captioned/webdataset"
    data = dict(source=f"{shards}/{{00000..00002}}.tar", streaming=True, shuffle_buffer=16)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        recipe = tiny_tokenizer_recipe(out, train=dict(save_every=0, max_steps=4), data=data)
        recipe["data"].pop("shapes")
        launcher = accelerate_launcher if processes == 2 else None
        run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)),
                launcher=launcher)  # fmt: skip
        runs[processes] = out
    assert summary(runs[2])["num_processes"] == 2
    assert_same_training(runs[1], runs[2], "total", rel=1e-4)


@pytest.mark.parametrize(
    "name, sections",
    [
        # a gradient-trained codebook sits out the bypass steps (the projections train in
        # them), and the discriminator joins at step index 3 (then runs one forward per
        # backward): the first 2 steps leave both out, the third the discriminator only, the
        # fourth neither (one launch for both: a launch costs ~15 s); the codebook diversity
        # loss, from the third step, takes its batch mean over every rank's rows, its weight
        # halved at the fourth (diversity_decay_steps: the same step, so weight, on each rank)
        (
            "bypass-factorised-gan-start-step-diversity",
            dict(
                quantizer=dict(
                    bypass_steps=2,
                    codebook_dim=4,
                    diversity_weight=0.5,
                    diversity_temperature=0.05,
                    diversity_decay_steps=2,
                ),
                loss=dict(adversarial_weight=0.1, adversarial_start_step=3),
            ),
        ),
        ("bypass-seed", dict(quantizer=dict(preset="seed", bypass_steps=2))),
        # the photos recipe's network (no output norms) on flipped, hue-rotated crops: each
        # row's flip and hue are drawn from (seed, epoch, row), so both ranks see one process's
        (
            "augmented-no-output-norm",
            dict(data=dict(hflip=True, hue_jitter=0.5), model=dict(norm_out=False)),
        ),
        # LFQ's entropy penalty takes the batch mean over every rank's rows; the local
        # encoder (model.local_encoder: per-position norms, no statistic across rows or ranks)
        (
            "bypass-lfq-local-encoder",
            dict(
                model=dict(local_encoder=True),
                quantizer=dict(type="lfq", bypass_steps=2, codebook_dim=5, restart_after_steps=20),
            ),
        ),  # VQ's field: its default
    ],
)
def test_steps_that_leave_parameters_unused_train_in_two_processes(
    tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml, accelerate_launcher, name, sections
):
    runs = {}
    for processes in (1, 2):
        out = runs[processes] = tmp_path / f"run{processes}"
        recipe = tiny_tokenizer_recipe(out, train=dict(save_every=0, max_steps=4), **sections)
        run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)),
                launcher=accelerate_launcher if processes == 2 else None)  # fmt: skip
    out = runs[2]
    assert summary(out)["num_processes"] == 2 and summary(out)["replica_max_abs_diff"] == 0.0
    assert_same_training(runs[1], runs[2], "total", rel=1e-4)  # trains like one process
    quantizer = sections.get("quantizer", {})
    if quantizer.get("diversity_weight") or quantizer.get("type") == "lfq":
        # LFQ's entropy penalty, VQ's diversity loss: the batch mean over every rank's rows
        one, two = ({r["step"]: r["entropy"] for r in read_metrics(run, "train") if "entropy" in r}
                    for run in (runs[1], runs[2]))  # fmt: skip
        assert one and one.keys() == two.keys()
        assert all(two[step] == pytest.approx(one[step], rel=1e-4) for step in one), (one, two)


# ---------------------------------------------------------------------------------------------
# resume: bit-exact from any checkpoint, in one and two processes


@pytest.mark.parametrize("processes", [1, 2])
def test_resume_is_bit_exact_from_mid_epoch_and_epoch_boundaries(
    processes, full_tokenizer_runs, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml,
    accelerate_launcher,
):  # fmt: skip
    """The 12-step runs resumed into a new folder from step 10 (mid-epoch, in the second epoch:
    the epoch's order and the skip together) and, in one process, from step 8 (the epoch
    boundary): the same losses after the checkpoint and the same final weights, byte for byte.
    (A mid-epoch resume in the first epoch: tokenizer/test_train.py.) Two processes resume once:
    each launch costs ~10-15 s."""
    launcher = accelerate_launcher if processes == 2 else None
    full = full_tokenizer_runs[processes]
    reference = {r["step"]: r["total"] for r in read_metrics(full, "train")}
    for step in (8, 10) if processes == 1 else (10,):
        out = tmp_path / f"from_{step}"
        recipe = tiny_tokenizer_recipe(out, train=TOKENIZER_TRAIN, quantizer=TOKENIZER_QUANTIZER)
        cfg = write_yaml(tmp_path / f"{step}.yaml", recipe)
        checkpoint = full / "checkpoints" / f"step_{step}"
        result = run_cli(
            "train-tokenizer", "--config", str(cfg), "--resume", str(checkpoint), launcher=launcher
        )
        assert f"at step {step}" in result.stdout + result.stderr
        resumed = {r["step"]: r["total"] for r in read_metrics(out, "train")}
        assert sorted(resumed) == list(range(step + 1, 13))
        assert all(resumed[s] == reference[s] for s in resumed), (step, resumed, reference)
        assert sha(out / "final" / "model.safetensors") == sha(full / "final" / "model.safetensors")


def test_resume_with_another_process_count_is_refused(
    full_tokenizer_runs, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    """A checkpoint of two processes, resumed by one: refused before a step, nothing written."""
    out = tmp_path / "run"
    recipe = tiny_tokenizer_recipe(out, train=TOKENIZER_TRAIN, quantizer=TOKENIZER_QUANTIZER)
    checkpoint = full_tokenizer_runs[2] / "checkpoints" / "step_4"
    result = run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)),
                     "--resume", str(checkpoint), check=False)  # fmt: skip
    assert result.returncode != 0
    assert "written by 2 process(es); resume it with 2" in result.stderr
    assert not (out / "final").exists() and not read_metrics(out, "train")


# ---------------------------------------------------------------------------------------------
# stage two


def test_lm_in_two_processes_and_with_accumulation_trains_like_one(
    tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml, accelerate_launcher
):
    """Captions, text-to-image and (30% of the examples) shapes stories documents, with the
    recipes' noisy context; two processes save one loadable pipeline and log each step once."""
    codes = tmp_path / "codes"  # pretokenized once, shared
    stories = dict(num_stories=24, num_test_stories=4, max_scenes=2, image_size=32)
    documents = dict(source="shapes_stories", stories=stories)
    runs = {}
    for name, train, launcher in (
        ("one", dict(batch_size=4), None),
        ("two", dict(batch_size=4), accelerate_launcher),
        ("two-accumulate", dict(batch_size=2, gradient_accumulation_steps=2), accelerate_launcher),
    ):
        out = tmp_path / name
        recipe = tiny_lm_recipe(tiny_tokenizer_run, out, codes, train=dict(save_every=0, **train))
        recipe["data"]["documents"] = documents
        recipe["sequences"]["document_ratio"] = 0.3
        recipe["sequences"]["image_input_noise"] = 0.2  # as the shipped recipes: same noise
        cfg = write_yaml(tmp_path / f"{name}.yaml", recipe)
        result = run_cli("train-lm", "--config", str(cfg), launcher=launcher)
        assert "pipeline saved to" in result.stderr
        runs[name] = out
    for name in ("two", "two-accumulate"):
        assert not (runs[name] / "final.tmp").exists()
        info = summary(runs[name])
        assert (info["num_processes"], info["replica_max_abs_diff"]) == (2, 0.0)
        # one writer: every step logged once, not once per rank
        assert [r["step"] for r in read_metrics(runs[name], "train")] == [1, 2, 3, 4, 5, 6]
        for key in ("loss", "image_loss", "text_loss"):
            assert_same_training(runs["one"], runs[name], key, rel=1e-4)
    Pipeline.from_pretrained(runs["two"])


@pytest.mark.parametrize("processes", [1, 2])
def test_lm_resume_is_bit_exact_with_dropout(
    processes, tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml,
    accelerate_launcher,
):  # fmt: skip
    """Dropout 0.1 (drawn from the RNG a checkpoint restores) and the noisy context (seeded per
    window); resumed from step 10 (mid-epoch,
    second epoch: an epoch is 8 steps) and, in one process, from step 8 (the epoch boundary): the
    same losses after the checkpoint, the same final weights. (A mid-epoch resume in the first
    epoch: lm/test_train.py.) Two processes resume once: each launch costs ~15 s."""
    launcher = accelerate_launcher if processes == 2 else None
    codes = tmp_path / "codes"

    def recipe(out: Path) -> Path:
        train = dict(max_steps=12, save_every=2, keep_checkpoints=6)
        cfg = tiny_lm_recipe(
            tiny_tokenizer_run, out, codes, train=train, model=dict(dropout=0.1),
            sequences=dict(image_input_noise=0.2),  # its draws, too, must repeat after a resume
        )  # fmt: skip
        return write_yaml(out.parent / f"{out.name}.yaml", cfg)

    full = tmp_path / "full"
    run_cli("train-lm", "--config", str(recipe(full)), launcher=launcher)
    reference = {r["step"]: r["loss"] for r in read_metrics(full, "train")}
    for step in (8, 10) if processes == 1 else (10,):
        out = tmp_path / f"from_{step}"
        checkpoint = full / "checkpoints" / f"step_{step}"
        run_cli("train-lm", "--config", str(recipe(out)), "--resume", str(checkpoint),
                launcher=launcher)  # fmt: skip
        resumed = {r["step"]: r["loss"] for r in read_metrics(out, "train")}
        assert sorted(resumed) == list(range(step + 1, 13))
        assert all(resumed[s] == reference[s] for s in resumed), (step, resumed, reference)
        assert sha(out / "final" / "model.safetensors") == sha(full / "final" / "model.safetensors")


def test_lm_with_muon_trains_in_two_processes_like_one_and_resumes_bit_exactly(
    tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml, accelerate_launcher
):
    """`train.optimizer=muon`: each rank orthogonalises the same all-reduced gradients, so two
    processes follow one process's curve; the checkpoint holds both optimizers' state (Muon's
    momentum, AdamW's moments), and a resume from it ends on the same weights."""
    codes = tmp_path / "codes"

    def recipe(out: Path) -> Path:
        train = dict(max_steps=8, save_every=4, keep_checkpoints=4, optimizer="muon")
        cfg = tiny_lm_recipe(tiny_tokenizer_run, out, codes, train=train)
        return write_yaml(out.parent / f"{out.name}.yaml", cfg)

    runs = {}
    for processes in (1, 2):
        out = runs[processes] = tmp_path / f"run{processes}"
        run_cli("train-lm", "--config", str(recipe(out)),
                launcher=accelerate_launcher if processes == 2 else None)  # fmt: skip
    for key in ("loss", "image_loss", "text_loss"):
        assert_same_training(runs[1], runs[2], key, rel=1e-4)
    assert summary(runs[2])["replica_max_abs_diff"] == 0.0
    reference = {r["step"]: r["loss"] for r in read_metrics(runs[2], "train")}
    out = tmp_path / "from_4"
    run_cli("train-lm", "--config", str(recipe(out)), "--resume",
            str(runs[2] / "checkpoints" / "step_4"), launcher=accelerate_launcher)  # fmt: skip
    resumed = {r["step"]: r["loss"] for r in read_metrics(out, "train")}
    assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[s] == reference[s] for s in resumed)
    assert sha(out / "final" / "model.safetensors") == sha(runs[2] / "final" / "model.safetensors")
