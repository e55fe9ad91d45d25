"""Benchmark: N processes train like one process, in both stages (docs/results.md).

    python scripts/bench_processes.py              # 50 optimizer steps per run
    python scripts/bench_processes.py --steps 12   # a quick look
    python scripts/bench_processes.py --unused     # step time: weight-0 participation of unused
                                                   # parameters vs find_unused_parameters=True

Runs the real CLI on this machine's CPUs (gloo, OMP_NUM_THREADS=1 per process) on tiny recipes
(32 px shapes, 8x8 codes, K=32; a 2-layer GPT-2), each run against the one-process run at the
same global batch: 2 processes; 2 processes with gradient accumulation 2 (half the micro-batch);
2 "machines" on one host (configs/accelerate/multi_node_cpu.yaml, machine ranks 0 and 1). For
stage two it adds FSDP2 (torch's `fully_shard`, 2 processes), which Accelerate runs on GPUs only:
tests/lm/dist_scripts/fsdp_lm_train.py, the trainer's parts through torch's API, compared with one
unsharded process inside the same script. Stage one's quantizer updates (EMA, k-means, dead-code
restarts) act per micro-batch, so its accumulation row is compared with one process that
accumulates the same micro-batches.

Columns: LR equal at every step; the largest relative difference of the logged loss over all
steps; the largest absolute difference of any final weight; seconds per optimizer step (the
mean over steps 11..N, wall clock, all processes busy). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

from vqgpt.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
SHAPES = dict(num_images=64, num_test_images=16, image_size=32)  # 8 steps of 8 per epoch
FSDP_SCRIPT = ROOT / "tests" / "lm" / "dist_scripts" / "fsdp_lm_train.py"


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_processes() -> list[str]:
    return [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            free_port()]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def train_section(out: Path, steps: int, batch: int, accumulate: int) -> dict:
    """Both stages: log every step, no evaluation or checkpoints, one thread per process."""
    return dict(output_dir=str(out), batch_size=batch, gradient_accumulation_steps=accumulate,
                max_steps=steps, warmup_steps=5, log_every=1, eval_every=0, save_every=0,
                num_threads=1)  # fmt: skip


def tokenizer_recipe(out: Path, steps: int, batch: int = 8, accumulate: int = 1) -> dict:
    return {
        "model": dict(
            image_size=32, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4
        ),
        "quantizer": dict(codebook_size=32, restart_after_steps=2),
        "data": dict(source="shapes", shapes=SHAPES),
        "train": train_section(out, steps, batch, accumulate),
        "eval": dict(max_images=16, batch_size=16, grid_images=4),
    }


def lm_recipe(out: Path, tokenizer: Path, codes: Path, steps: int, batch: int = 4,
              accumulate: int = 1) -> dict:  # fmt: skip
    return {
        "data": dict(
            tokenizer=str(tokenizer),
            output_dir=str(codes),
            batch_size=32,
            images=dict(source="shapes", shapes=SHAPES),
        ),  # fmt: skip
        "sequences": dict(max_length=160, caption_dropout=0.2),
        "model": dict(preset="tiny"),
        "train": train_section(out, steps, batch, accumulate),
        "eval": dict(max_images=0),
    }


def run(command: str, recipe: dict, where: Path, launcher: list[str] | None = None) -> Path:
    cfg = where.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(recipe))
    cmd = (launcher or [sys.executable]) + ["-m", "vqgpt.cli", command, "--config", str(cfg)]
    subprocess.run(cmd, check=True, env=env(), capture_output=True, text=True)
    return where


def two_machines(command: str, recipe: dict, where: Path) -> Path:
    cfg = where.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(recipe))
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *LAUNCH,
                "--config_file",
                str(ROOT / "configs/accelerate/multi_node_cpu.yaml"),
                "--machine_rank",
                str(rank),
                "--main_process_port",
                port,
                "-m",
                "vqgpt.cli",
                command,
                "--config",
                str(cfg),
            ],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"two machines failed:\n{err[-3000:]}")
    return where


def curve(run_dir: Path, key: str) -> dict[int, tuple[float, float, float]]:
    """step -> (lr, loss, elapsed_s)."""
    return {r["step"]: (r["lr"], r[key], r["elapsed_s"]) for r in read_metrics(run_dir, "train")}


def compare(name: str, one: Path, other: Path, key: str, weights: str) -> dict:
    a, b = curve(one, key), curve(other, key)
    if sorted(a) != sorted(b):
        raise SystemExit(f"{name}: steps differ")
    steps = sorted(b)
    wa, wb = load_file(one / "final" / weights), load_file(other / "final" / weights)
    late = [s for s in steps if s > 10] or steps
    per_step = (b[late[-1]][2] - b[late[0]][2]) / max(len(late) - 1, 1)
    return {
        "run": name,
        "lr_equal": all(a[s][0] == b[s][0] for s in steps),
        "max_rel_loss_diff": max(abs(b[s][1] - a[s][1]) / abs(a[s][1]) for s in steps),
        "max_weight_diff": max(float((wb[k].double() - wa[k].double()).abs().max()) for k in wa),
        "s_per_step": per_step,
        "steps": len(steps),
    }


def fsdp_row(tokenizer: Path, where: Path, steps: int) -> dict:
    cmd = [*two_processes(), str(FSDP_SCRIPT), str(tokenizer / "final"), str(where)]
    subprocess.run(cmd, check=True, env={**env(), "FSDP_STEPS": str(steps)}, capture_output=True)
    record = json.loads((where / "result.json").read_text())
    ref, got = record["reference"], record["fsdp"]
    return {
        "run": "FSDP2, 2 processes (fully_shard)",
        "lr_equal": [lr for _, lr in ref] == [lr for _, lr in got],
        "max_rel_loss_diff": max(
            abs(g[0] - r[0]) / abs(r[0]) for g, r in zip(got, ref, strict=True)
        ),
        "max_weight_diff": record["max_weight_diff"],
        "s_per_step": record["fsdp_s_per_step"],
        "steps": len(got),
    }


def cli_with_find_unused(argv: list[str]) -> None:
    """vqgpt's CLI with DDP's find_unused_parameters=True (the alternative, for timing only)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    init = Accelerator.__init__

    def patched(self, *args, **kwargs):
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        init(self, *args, **kwargs)

    Accelerator.__init__ = patched
    from vqgpt.cli import main as cli_main

    raise SystemExit(cli_main(argv))


def unused_table(steps: int, repeats: int = 2) -> None:
    """Seconds per step of 2 processes (tiny factorised tokenizer) with the quantizer bypassed on
    no step or on every step, vqgpt's weight-0 participation vs find_unused_parameters."""
    print(f"2 processes, tiny tokenizer with factorised codes, {steps} steps, mean s / step over "
          f"steps 11..{steps}, {repeats} repeats\n")  # fmt: skip
    print("| bypass_steps | weight-0 participation (ships) | find_unused_parameters=True |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for bypass in (0, steps):
            cells = []
            for how in ("vqgpt", "find_unused"):
                times = []
                for rep in range(repeats):
                    out = Path(tmp) / f"{how}_{bypass}_{rep}"
                    recipe = tokenizer_recipe(out, steps)
                    recipe["quantizer"].update(bypass_steps=bypass, codebook_dim=4)
                    cfg = out.with_suffix(".yaml")
                    cfg.write_text(yaml.safe_dump(recipe))
                    target = (["-m", "vqgpt.cli"] if how == "vqgpt"
                              else [__file__, "--as-cli-with-find-unused"])  # fmt: skip
                    cmd = [*two_processes(), *target, "train-tokenizer", "--config", str(cfg)]
                    subprocess.run(cmd, check=True, env=env(), capture_output=True)
                    r = {m["step"]: m["elapsed_s"] for m in read_metrics(out, "train")}
                    times.append((r[steps] - r[10]) / (steps - 10))
                cells.append(", ".join(f"{t:.4f}" for t in times))
            print(f"| {bypass} | {cells[0]} | {cells[1]} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-cli-with-find-unused":
        cli_with_find_unused(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--unused", action="store_true", help="the unused-parameter table only")
    args = parser.parse_args()
    n = args.steps
    if args.unused:
        unused_table(n)
        return
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        one = run("train-tokenizer", tokenizer_recipe(t / "tok_one", n), t / "tok_one")
        rows.append(
            ("one", compare("1 process (reference)", one, one, "total", "model.safetensors"))
        )
        two = run("train-tokenizer", tokenizer_recipe(t / "tok_two", n), t / "tok_two",
                  two_processes())  # fmt: skip
        rows.append(("one", compare("2 processes", one, two, "total", "model.safetensors")))
        one_acc = run("train-tokenizer", tokenizer_recipe(t / "tok_one_acc", n, 4, 2),
                      t / "tok_one_acc")  # fmt: skip
        two_acc = run("train-tokenizer", tokenizer_recipe(t / "tok_two_acc", n, 4, 2),
                      t / "tok_two_acc", two_processes())  # fmt: skip
        rows.append(("one", compare("2 processes, accumulation 2 (vs 1 process, accumulation 2)",
                                    one_acc, two_acc, "total", "model.safetensors")))  # fmt: skip
        rows.append(("one", compare("2 processes, accumulation 2 (vs 1 process, batch 8)",
                                    one, two_acc, "total", "model.safetensors")))  # fmt: skip
        mach = two_machines("train-tokenizer", tokenizer_recipe(t / "tok_mach", n), t / "tok_mach")
        rows.append(("one", compare("2 machines x 1 process", one, mach, "total",
                                    "model.safetensors")))  # fmt: skip

        codes = t / "codes"
        lm = {}
        for name, batch, acc, how in (
            ("one", 4, 1, None), ("two", 4, 1, "2"), ("acc", 2, 2, "2"), ("mach", 4, 1, "m"),
        ):  # fmt: skip
            recipe = lm_recipe(t / f"lm_{name}", one, codes, n, batch, acc)
            if how == "m":
                lm[name] = two_machines("train-lm", recipe, t / f"lm_{name}")
            else:
                lm[name] = run(
                    "train-lm", recipe, t / f"lm_{name}", two_processes() if how else None
                )
        for name, label in (
            ("one", "1 process (reference)"), ("two", "2 processes"),
            ("acc", "2 processes, accumulation 2"), ("mach", "2 machines x 1 process"),
        ):  # fmt: skip
            rows.append(("two", compare(label, lm["one"], lm[name], "loss", "model.safetensors")))
        rows.append(("two", fsdp_row(one, t / "fsdp", n)))

    print(f"{n} optimizer steps per run, global batch 8 images (stage one) / 4 windows of 160 "
          "tokens (stage two), CPU, gloo, OMP_NUM_THREADS=1\n")  # fmt: skip
    print("| stage | run | LR identical | max rel. loss diff | max final weight diff | s / step |")
    print("|---|---|---|---|---|---|")
    for stage, r in rows:
        print(f"| {stage} | {r['run']} | {'yes' if r['lr_equal'] else 'NO'} | "
              f"{r['max_rel_loss_diff']:.1e} | {r['max_weight_diff']:.1e} | "
              f"{r['s_per_step']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
