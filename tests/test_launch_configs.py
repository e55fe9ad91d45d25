"""Every launch config in configs/accelerate/ does what it says, or says why it cannot here.

On this CPU machine: cpu_2proc.yaml starts two processes; multi_node_cpu.yaml runs as two
"machines" on one host (two `accelerate launch` commands, machine ranks 0 and 1) and trains like
one process, in both stages; the FSDP and DeepSpeed configs are refused with a message instead of
silently falling back to plain data parallel; the GPU configs are checked field by field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vqgpt.training import read_metrics

pytestmark = pytest.mark.slow
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def configs(repo_root: Path) -> Path:
    return repo_root / "configs" / "accelerate"


def summary(run: Path) -> dict:
    return json.loads((run / "final" / "eval.json").read_text())


def test_every_config_is_tested_here(repo_root):
    names = {p.name for p in configs(repo_root).glob("*.yaml")}
    assert names == {
        "cpu_2proc.yaml",
        "multi_node_cpu.yaml",
        "multi_gpu.yaml",
        "single_gpu.yaml",
        "multi_node_fsdp.yaml",
        "multi_node_deepspeed.yaml",
    }


def test_cpu_2proc_starts_two_processes(
    repo_root, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml, free_port
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(out, train=dict(max_steps=2)))
    port = str(free_port())
    launcher = [*LAUNCH, "--config_file", str(configs(repo_root) / "cpu_2proc.yaml")]
    run_cli(
        "train-tokenizer", "--config", str(cfg), launcher=[*launcher, "--main_process_port", port]
    )
    info = summary(out)
    assert (info["num_processes"], info["distributed_type"]) == (2, "MULTI_CPU")


@pytest.mark.parametrize("stage", ["tokenizer", "lm"])
def test_two_machines_on_one_host_train_like_one_process(
    stage, repo_root, tmp_path, run_cli, python_forked, tiny_tokenizer_recipe, tiny_lm_recipe,
    tiny_tokenizer_run, write_yaml, free_port, launch_worker,
):  # fmt: skip
    runs = {}
    for name in ("one", "two-machines"):
        out = tmp_path / name
        if stage == "tokenizer":
            recipe = tiny_tokenizer_recipe(out, train=dict(max_steps=4, save_every=0))
        else:
            recipe = tiny_lm_recipe(tiny_tokenizer_run, out, tmp_path / "codes", train=dict(max_steps=4, save_every=0))  # fmt: skip
        runs[name] = (out, write_yaml(tmp_path / f"{name}.yaml", recipe))
    command = "train-tokenizer" if stage == "tokenizer" else "train-lm"
    run_cli(command, "--config", str(runs["one"][1]))
    port = str(free_port())
    config = str(configs(repo_root) / "multi_node_cpu.yaml")
    python, env = python_forked()  # the two launchers run side by side
    machines = [
        subprocess.Popen(
            [
                *python,
                *LAUNCH[1:],
                "--config_file",
                config,
                "--machine_rank",
                str(rank),
                "--main_process_port",
                port,
                str(launch_worker),
                "-m",
                "vqgpt.cli",
                command,
                "--config",
                str(runs["two-machines"][1]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for proc in machines:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-5000:]
    info = summary(runs["two-machines"][0])
    assert (info["num_processes"], info["replica_max_abs_diff"]) == (2, 0.0)
    key = "total" if stage == "tokenizer" else "loss"
    one = {r["step"]: (r["lr"], r[key]) for r in read_metrics(runs["one"][0], "train")}
    two = {r["step"]: (r["lr"], r[key]) for r in read_metrics(runs["two-machines"][0], "train")}
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step, (lr, value) in one.items():
        assert two[step][0] == lr and two[step][1] == pytest.approx(value, rel=1e-4), step


@pytest.mark.parametrize(
    "name, why",
    [
        ("multi_node_fsdp.yaml", "asks for FSDP"),
        ("multi_node_deepspeed.yaml", "DeepSpeed"),
    ],
)
def test_gpu_only_plugins_are_refused_on_this_machine(
    name, why, repo_root, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml, free_port
):
    cfg = write_yaml(tmp_path / "r.yaml", tiny_tokenizer_recipe(tmp_path / "run"))
    launcher = [
        *LAUNCH, "--config_file", str(configs(repo_root) / name), "--num_machines", "1",
        "--num_processes", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    result = run_cli("train-tokenizer", "--config", str(cfg), launcher=launcher, check=False)
    assert result.returncode != 0
    assert why in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()  # nothing trained in its place


@pytest.mark.parametrize(
    "name, distributed_type, processes",
    [("single_gpu.yaml", "NO", 1), ("multi_gpu.yaml", "MULTI_GPU", 8)],
)
def test_gpu_configs_say_what_they_do(name, distributed_type, processes, repo_root):
    """Checked, not launched: this machine has no GPU."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(configs(repo_root) / name))
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == processes and config.num_machines == 1
    assert str(config.mixed_precision) == "bf16" and not config.use_cpu
    raw = yaml.safe_load((configs(repo_root) / name).read_text())
    assert raw["gpu_ids"] in ("0", "all")
