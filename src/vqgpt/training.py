"""The Accelerate training harness shared by both stages: config, schedule, checkpoints, metrics.

Several processes train like one (docs/design.md, "Several processes"): `train.batch_size` is the
global micro-batch, split across the N processes (each gets batch_size / N examples of the same
global batch, in rank order), the LR schedule advances once per optimizer step whatever N is,
and logged metrics are global means (sums and weights all-reduced at log time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from tqdm.auto import tqdm

from vqgpt.artifacts import TRAINER_STATE, DamagedFileError, check_checkpoint, checkpoint_files
from vqgpt.config import ConfigError, save_config
from vqgpt.cpu_memory import keep_freed_memory
from vqgpt.distributed import multi_cpu_run
from vqgpt.errors import VqgptError
from vqgpt.files import FileReadError, read_json, read_json_lines, write_text
from vqgpt.optim import MuonWithAdamW
from vqgpt.recipes import packaged_recipe

CHECKPOINT_PREFIX = "step_"
logger = logging.getLogger(__name__)


OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    output_dir: str = "runs/tokenizer"
    seed: int = 0
    batch_size: int = 32  # examples per micro-batch over all processes (each gets batch_size / N)
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # wall-clock budget: stop early (and save) when reached
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    # "adamw" | "muon": Muon on the LM's hidden matrices, AdamW on the rest, both at
    # learning_rate (vqgpt.optim; the LM only)
    optimizer: str = "adamw"
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    log_every: int = 10
    eval_every: int = 250
    save_every: int = 250
    keep_checkpoints: int = 2
    log_with: str | None = None  # any Accelerate tracker ("tensorboard", "wandb", ...)
    num_threads: int | None = None  # torch CPU threads per process (None: torch's default)
    # CPU runs on Linux: glibc keeps freed big blocks for reuse (vqgpt.cpu_memory; ~1.2x faster
    # LM steps, same numbers; the process keeps its peak resident memory)
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1")
        for key in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0 (0 turns it off)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError("train.mixed_precision must be 'no', 'bf16' or 'fp16'")
        if self.learning_rate <= 0:
            raise ConfigError("train.learning_rate must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio must be in [0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )


def sharding_plugin() -> str | None:
    """ "FSDP" or "DEEPSPEED" when the Accelerate launch config asks for it
    (ACCELERATE_USE_<PLUGIN>=true), else None."""
    for plugin in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{plugin}", "false").lower() == "true":
            return plugin
    return None


def check_launch() -> None:
    """Refuse a launch config this machine cannot honour (instead of silently ignoring it)."""
    plugin = sharding_plugin()
    if plugin is not None and not torch.cuda.is_available():
        raise ConfigError(
            f"the launch config asks for {plugin} (ACCELERATE_USE_{plugin}=true), which "
            "Accelerate runs on GPUs only, and this machine has none; launch with "
            f"{packaged_recipe('accelerate/cpu_2proc.yaml')} (plain data parallel) or on a "
            "GPU machine"
        )


CPU_BF16_ENV = "VQGPT_CPU_BF16"  # "1": keep bf16 autocast on a CPU that only emulates it


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware, so that bf16 autocast is faster than
    float32 on it: AVX512-BF16 or AMX on x86-64 (Intel Cooper Lake, Sapphire Rapids and later; AMD
    Zen 4 and later), the BF16 extension on arm64 Linux (`bf16` in /proc/cpuinfo's Features).

    Without it PyTorch emulates bf16 on the CPU: measured on an AVX2-only AMD EPYC (2 cores,
    torch 2.13.0), a [2048, 1024] x [1024, 1024] product took 4.5 s in bf16 against 0.027 s in
    float32, and a 3x3 convolution under bf16 autocast 33x its float32 time.
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if machine in ("aarch64", "arm64") and sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return True  # unknown: keep what the config asks for
        features = [line.split(":", 1)[1].split() for line in text.splitlines()
                    if line.startswith("Features")]  # fmt: skip
        return any("bf16" in row for row in features)
    return True  # other CPUs (Apple silicon, ...): not known to vqgpt; keep the config's choice


def trains_on_cpu() -> bool:
    """Whether this process trains on the CPU: a multi-CPU launch, or no accelerator at all."""
    return multi_cpu_run() or not torch.accelerator.is_available()


def bf16_emulated() -> bool:
    """Whether this run trains on a CPU that only emulates bf16 (`cpu_has_native_bf16`), so that
    bf16 work should run in float32 instead; `VQGPT_CPU_BF16=1` says no (keep bf16, to reproduce
    a bf16 machine's numerics). Read by `run_precision` and `muon_ns_dtype`."""
    return os.environ.get(CPU_BF16_ENV) != "1" and trains_on_cpu() and not cpu_has_native_bf16()


def muon_ns_dtype() -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iterations in this run (`vqgpt.optim.Muon`): bfloat16
    (torch's), or float32 where bf16 is emulated (`bf16_emulated`: those products would cost
    ~170x float32's)."""
    return torch.float32 if bf16_emulated() else torch.bfloat16


def run_precision(cfg: TrainConfig) -> str:
    """The precision this run trains in: `cfg.mixed_precision`, except that bf16 on a CPU without
    native bf16 (`cpu_has_native_bf16`) trains in float32 ("no"), with one warning: there bf16
    autocast is tens of times slower than float32, so a recipe's minutes would buy a few dozen
    steps. `VQGPT_CPU_BF16=1` keeps bf16 anyway (to reproduce a bf16 run's numerics)."""
    if cfg.mixed_precision != "bf16" or not bf16_emulated():
        return cfg.mixed_precision
    if os.environ.get("RANK", "0") == "0":  # one warning, not one per process
        logger.warning(
            "train.mixed_precision=bf16, but this CPU has no native bf16 (AVX512-BF16, AMX or "
            "arm64 BF16), where bf16 runs tens of times slower than float32: training in float32 "
            "instead (%s=1 keeps bf16)",
            CPU_BF16_ENV,
        )
    return "no"


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """One Accelerator for the run: mixed precision (`run_precision`: bf16 on a CPU without
    native bf16 runs in float32), accumulation, split global batches, seedable data order."""
    check_launch()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.keep_freed_memory and trains_on_cpu():
        keep_freed_memory()
    # One process may train several runs (`vqgpt demo`: the tokenizer, then the LM), each with its
    # own precision; Accelerate keeps that in a singleton, so every run starts from a fresh one
    # (the process group lives in PartialState, which stays).
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=multi_cpu_run(),
        mixed_precision=run_precision(cfg),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir),
        # split_batches: a prepared DataLoader yields the global batch split across processes,
        # and a prepared scheduler steps once per optimizer step (not once per process)
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )


def local_batch_size(tc: TrainConfig, accelerator: Accelerator) -> int:
    """This process's share of the global micro-batch `train.batch_size`."""
    n = accelerator.num_processes
    if tc.batch_size % n:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is the global micro-batch and must split evenly "
            f"across the {n} processes; use a multiple of {n}"
        )
    return tc.batch_size // n


def build_optimizer(
    model: torch.nn.Module,
    tc: TrainConfig,
    betas: tuple[float, float] | None = None,
    matrices: Sequence[torch.nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """The run's optimizer at `tc.learning_rate` (betas: `tc.betas` unless given) for both stages.

    `tc.optimizer == "adamw"`: AdamW. Weight decay `tc.weight_decay` on matrices and kernels only
    (ndim >= 2: linear and conv weights, embeddings, a gradient-trained codebook); norms' gains
    and every bias are not decayed (nanoGPT's and most GPT recipes' rule). torch's default
    implementation: multi-tensor (foreach) on GPUs, one tensor at a time on the CPU. Not `fused`:
    its different rounding sent the demo's tokenizer to another minimum (held-out PSNR 30.85 dB
    instead of 32.43, the demo's text-to-image ceiling from 86.5% to 78.0%: docs/results.md,
    "Session 4").

    `tc.optimizer == "muon"`: Muon on `matrices` (the caller's hidden 2-D weights: the LM's
    transformer blocks, `vqgpt.lm.model.hidden_matrices`), AdamW as above on every other
    parameter (`vqgpt.optim.MuonWithAdamW`; its Newton-Schulz iterations in `muon_ns_dtype()`).

    Raises:
        ConfigError: Muon asked for by a caller without hidden matrices (the tokenizer), with a
            torch before 2.9 (no `torch.optim.Muon`), or under an FSDP / DeepSpeed launch (Muon
            needs each matrix whole on every process).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "muon":
        if not matrices:
            raise ConfigError(
                "train.optimizer=muon is for the LM's hidden matrices; this model trains with "
                "train.optimizer=adamw"
            )
        if not hasattr(torch.optim, "Muon"):  # pyproject allows torch >= 2.4
            raise ConfigError(
                f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                f"{torch.__version__}: upgrade it, or use train.optimizer=adamw"
            )
        plugin = sharding_plugin()
        if plugin is not None:
            raise ConfigError(
                f"train.optimizer=muon needs each matrix whole on every process, and the launch "
                f"shards them ({plugin}); use train.optimizer=adamw, or launch with plain data "
                "parallel"
            )
        muon = {id(p) for p in matrices}
        rest = [p for p in params if id(p) not in muon]
        groups = [
            {"params": [p for p in rest if p.ndim >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        ]
        return MuonWithAdamW(
            [p for p in params if id(p) in muon],
            [g for g in groups if g["params"]],
            lr=tc.learning_rate,
            weight_decay=tc.weight_decay,
            betas=betas or tc.betas,
            ns_dtype=muon_ns_dtype(),
        )
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=betas or tc.betas)


def holds_a_run(output_dir: str | Path) -> bool:
    """True when `output_dir` holds what a training run writes (metrics, checkpoints, final/)."""
    out = Path(output_dir)
    return (
        (out / "metrics.jsonl").is_file() or (out / "final").is_dir() or bool(list_checkpoints(out))
    )


def start_run(recipe: Any, tc: TrainConfig, project: str, resume: str | None = None) -> Accelerator:
    """Seed, build the Accelerator, write <run>/config.yaml, start any tracker.

    Raises ConfigError when a fresh run (no `resume`) would write into a folder that already
    holds a run: its metrics would mix and its checkpoints would be resumed later by mistake.
    """
    if resume is None and holds_a_run(tc.output_dir):
        raise ConfigError(
            f"{tc.output_dir} already holds a training run; continue it with --resume latest, "
            "or set another train.output_dir (or delete the folder) to start a new one"
        )
    set_seed(tc.seed)
    accelerator = build_accelerator(tc)
    if accelerator.is_main_process:
        Path(tc.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(recipe, Path(tc.output_dir) / "config.yaml")
    if tc.log_with:
        accelerator.init_trackers(project)
    return accelerator


def resume_run(
    accelerator: Accelerator, tc: TrainConfig, resume: str | None
) -> tuple[MetricsLog, TrainerState]:
    """The metrics log and where to start: fresh, or from `--resume` (latest or a folder)."""
    metrics = MetricsLog(accelerator, tc.output_dir)
    checkpoint = resolve_resume(tc.output_dir, resume)
    if checkpoint is None:
        if resume is not None:
            accelerator.print(
                f"--resume {resume}: no checkpoint in {tc.output_dir}, starting fresh",
                file=sys.stderr,
            )
        metrics.truncate_after(0)  # a run killed before its first checkpoint logged steps
        return metrics, TrainerState(num_processes=accelerator.num_processes)
    state = load_checkpoint(accelerator, checkpoint)
    metrics.truncate_after(state.step)
    accelerator.print(f"resumed from {checkpoint} at step {state.step}", file=sys.stderr)
    return metrics, state


def warmup_cosine(cfg: TrainConfig) -> Any:
    """LR multiplier: linear warmup to 1, then cosine down to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return factor


# ---------------------------------------------------------------------------------------------
# checkpoints: <run>/checkpoints/step_<N>/, written to a temporary folder and renamed when complete


@dataclass
class TrainerState:
    """Where the loop stands; saved beside Accelerate's state in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    elapsed_s: float = 0.0
    num_processes: int = 1  # processes that wrote the checkpoint


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a killed save are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[5:].isdigit()
    ]
    done = [p for p in done if (p / TRAINER_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume latest` -> newest complete checkpoint (None when there is none); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    return path


class _TiedWeightsNote(logging.Filter):
    """Drops Accelerate's "Removed shared tensor {'lm.lm_head.weight'} while saving" on every
    checkpoint: GPT-2's output layer is tied to its input embedding, stored once, and tied again
    on load (resume is bit-exact: tests/test_processes.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainerState, keep: int
) -> Path:
    """Accelerate `save_state` into step_<N>.tmp, then an atomic rename to step_<N>."""
    root = checkpoint_root(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(tmp / TRAINER_STATE, json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -keep or None] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resumed_iterator(batches: Iterable[Any]) -> Iterator[Any]:
    """An iterator over `batches` (a resumed run's rest of an epoch) whose start draws nothing
    from the global RNG that the checkpoint restored.

    Starting a DataLoader iterator draws one number from the global RNG (the seed of its
    workers). The uninterrupted run drew it at the start of the epoch, before the checkpoint; a
    resumed run starting its iterator mid-epoch (or at the epoch's end, then again for the next
    epoch) would draw again and shift every later random choice (dead-code restarts, dropout).
    The RNG state is saved before the iterator starts and put back after its first batch.
    """
    with rng_untouched():
        iterator = iter(batches)
        first = next(iterator, _END)
    return iter(()) if first is _END else itertools.chain([first], iterator)


_END = object()


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Run a block (an evaluation) without moving torch's, numpy's or Python's global RNG.

    Training continues with the random state it had before the block, as a run resumed from a
    checkpoint taken just before an evaluation does (the checkpoint is saved first, and the
    resumed run does not evaluate again): so resume stays bit-exact at evaluation steps. Without
    it a DataLoader started in the evaluation draws the seed of its workers from the global RNG.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states; return where the loop stood.

    A checkpoint resumes with the number of processes that wrote it (every process restores its
    own RNG states); another number is a ConfigError, before anything is loaded.
    Raises FileReadError naming trainer_state.json when it is missing, cut short or not a state.
    """
    state = read_trainer_state(path)
    if state.num_processes != accelerator.num_processes:
        raise ConfigError(
            f"{path} was written by {state.num_processes} process(es); resume it with "
            f"{state.num_processes} (accelerate launch --num_processes {state.num_processes}), "
            f"not {accelerator.num_processes}, or start a new run"
        )
    damaged = damaged_checkpoint(path)
    # FSDP and DeepSpeed save models, optimizers (and DeepSpeed's schedulers) in their own
    # layouts; their load errors are still caught below
    plain = accelerator.distributed_type not in SHARDED_TYPES
    files = checkpoint_files(
        models=len(accelerator._models) if plain else 0,
        optimizers=len(accelerator._optimizers) if plain else 0,
        schedulers=len(accelerator._schedulers) if plain else 0,
        process_index=accelerator.process_index,
        custom_objects=len(accelerator._custom_objects),
    )
    check_checkpoint(path, files, damaged)  # every file there and whole, before loading any
    try:
        accelerator.load_state(str(path))
    except VqgptError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, safetensors and pickle raise anything
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DamagedFileError(
            f"{path}: does not load ({type(err).__name__}: {first}); {damaged}"
        ) from err
    return state


SHARDED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def damaged_checkpoint(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint: the end of every message about one."""
    return (
        f"the checkpoint {checkpoint} is damaged: resume from an earlier one "
        "(--resume <run>/checkpoints/step_<N>) or delete this folder"
    )


def read_trainer_state(checkpoint: Path) -> TrainerState:
    """The TrainerState saved in `checkpoint`.

    Raises FileReadError naming the file when it is missing, not JSON (cut short) or lacks fields.
    """
    path = checkpoint / TRAINER_STATE
    damaged = damaged_checkpoint(checkpoint)
    if not path.is_file():
        raise FileReadError(f"{path} is missing: {damaged}")
    try:
        data = read_json(path)
    except FileReadError as err:
        raise FileReadError(f"{err}; {damaged}") from None
    try:
        return TrainerState(**data)
    except TypeError:
        raise FileReadError(
            f"{path} does not hold a trainer state ({data!r:.80}); {damaged}"
        ) from None


def save_final(accelerator: Accelerator, model: torch.nn.Module, output_dir: str | Path) -> Path:
    """`save_pretrained` into <run>/final/ via a temporary folder and an atomic rename."""
    final = Path(output_dir) / "final"
    tmp = Path(output_dir) / "final.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP shards (FSDP1 wrapping or FSDP2 DTensors)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state as plain CPU tensors on the main process ({} on the others).

    A collective under FSDP (every rank must call it): the shards are gathered with torch's
    `get_model_state_dict(full_state_dict=True, cpu_offload=True)`, the API Accelerate's own FSDP
    saving uses. Unsharded models (one process, data parallel) return their own state dict.
    Keys are those of the unwrapped module.
    """
    if not is_sharded(model):
        if not accelerator.is_main_process:
            return {}
        return dict(accelerator.unwrap_model(model).state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def out_of_time(accelerator: Accelerator, max_minutes: float | None, elapsed_s: float) -> bool:
    """True on every rank once any rank has spent the wall-clock budget (all stop at one step)."""
    if max_minutes is None:
        return False
    flag = torch.tensor([float(elapsed_s > max_minutes * 60)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@torch.no_grad()
def replica_max_abs_diff(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """Largest difference of any parameter or buffer between the ranks (0.0: replicas in sync)."""
    if accelerator.num_processes == 1 or is_sharded(model):
        return 0.0  # sharded: each rank holds a different part, and there is one copy of each
    state = accelerator.unwrap_model(model).state_dict()
    flat = torch.cat([t.detach().float().flatten() for t in state.values()])
    gathered = accelerator.gather(flat[None])  # (num_processes, numel)
    return float((gathered - gathered[0]).abs().max())


def progress_bar(accelerator: Accelerator, total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar on the local main process only (TQDM_DISABLE=1 in the environment silences it)."""
    quiet = {} if accelerator.is_local_main_process else {"disable": True}
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, **quiet)


# ---------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """Appends one JSON object per line to <run>/metrics.jsonl (main process) and to trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """Record `values` at `step`."""
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.accelerator.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs those steps again)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path.parent) if row["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        write_text(tmp, "".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)


def read_metrics(output_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of <run>/metrics.jsonl, optionally of one kind.

    A last line cut short (disk full, power loss) is left out with a warning; the next resume
    rewrites the file without it.
    Raises FileReadError naming the file and line for any other line that is not a record.
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    log = read_json_lines(path)
    if log.torn_tail is not None:
        logger.warning(
            "%s: the last line is cut short (%r), left out: the run stopped while writing it",
            path,
            log.torn_tail[:60],
        )
    for number, row in log.rows:
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise FileReadError(f"{path}:{number}: not a metrics record (no integer 'step')")
    return [row for _, row in log.rows if kind is None or row.get("kind") == kind]


# ---------------------------------------------------------------------------------------------
# the loop both stages run


Metric = float | tuple[float, float]  # a value, or (sum, weight) for a weighted mean
StepFn = Callable[[Any, int], dict[str, Metric]]


class Tally:
    """What `train_step` returned over one log interval on this process: per key a sum and a
    weight (a plain float counts as one value of weight 1), plus the summed "items"."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.items = 0.0

    def add(self, values: dict[str, Metric]) -> None:
        """Count one micro-batch's values."""
        for key, value in values.items():
            if key == "items":
                self.items += float(value)
                continue
            total, weight = value if isinstance(value, tuple) else (value, 1.0)
            self.sums[key] = self.sums.get(key, 0.0) + float(total)
            self.weights[key] = self.weights.get(key, 0.0) + float(weight)

    def global_means(self, accelerator: Accelerator) -> tuple[dict[str, float], float]:
        """(sum / weight per key, items) over every process: one all-reduce, a collective."""
        keys = sorted(self.sums)
        local = [self.sums[k] for k in keys] + [self.weights[k] for k in keys] + [self.items]
        flat = torch.tensor(local, dtype=torch.float64, device=accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum").tolist()
        n = len(keys)
        means = {k: flat[i] / flat[n + i] if flat[n + i] else math.nan for i, k in enumerate(keys)}
        return means, flat[-1]


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: torch.Tensor,
    grad_clip: float | None,
    unused: Sequence[torch.Tensor] = (),
) -> None:
    """Backward, clip on the step that syncs gradients, optimizer and schedule step, zero grads.

    `unused`: parameters that took part in this step with weight 0 only (so data parallel reduces
    every parameter, as it must, without find_unused_parameters' cost on every step); their zero
    gradients are dropped before the update, which then leaves them untouched, as a parameter
    without a gradient.
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        for p in unused:
            p.grad = None
        if grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run_loop(
    accelerator: Accelerator,
    tc: TrainConfig,
    model: torch.nn.Module,
    scheduler: Any,
    metrics: MetricsLog,
    state: TrainerState,
    epoch_batches: Callable[[int, int], Iterable[Any]],
    train_step: StepFn,
    evaluate: Callable[[int], str | None],
    desc: str,
    items_name: str = "items",
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> TrainerState:
    """Steps, logging, checkpoints, evaluation and stopping, the same for both stages.

    `epoch_batches(epoch, skip)` gives this rank's micro-batches of `epoch` after the first
    `skip` (so a resumed run continues in the same data order). `train_step(batch, step)` runs
    forward, backward and the optimizer steps of one micro-batch inside `accumulate`, and returns
    metrics (a float, or (sum, weight)); each is logged as its mean over the log interval and
    every process (`Tally`). Its key "items" (tokens, images) is summed instead and logged as
    `<items_name>_per_s`, all processes together. `on_log(logged)` runs on every rank before the
    record is written (a collective is allowed there). `evaluate(step)` runs on every rank (do
    the work on the main one) and may return a line to print. Returns the state after the last
    step.
    """
    bar = progress_bar(accelerator, tc.max_steps, state.step, desc)
    start = time.time() - state.elapsed_s

    def run_eval() -> None:
        with rng_untouched():
            line = evaluate(state.step)
        if line:
            bar.write(f"step {state.step}: {line}", file=sys.stderr)  # a message, not data
        accelerator.wait_for_everyone()

    model.train()
    stop = state.step >= tc.max_steps
    tally, clock = Tally(), time.time()
    while not stop:
        for batch in epoch_batches(state.epoch, state.batches_in_epoch):
            state.batches_in_epoch += 1
            with accelerator.accumulate(model):
                tally.add(train_step(batch, state.step))
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            state.elapsed_s = time.time() - start
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                logged, items = tally.global_means(accelerator)
                logged[f"{items_name}_per_s"] = items / max(time.time() - clock, 1e-9)
                logged["lr"] = scheduler.get_last_lr()[0]
                logged["elapsed_s"] = round(state.elapsed_s, 3)
                if on_log is not None:
                    on_log(logged)
                metrics.log(state.step, logged)
                first = next(iter(tally.sums), None)
                if first is not None:
                    bar.set_postfix({first: f"{logged[first]:.4f}"})
                tally, clock = Tally(), time.time()
                stop = out_of_time(accelerator, tc.max_minutes, state.elapsed_s)
            stop = stop or state.step >= tc.max_steps
            if tc.save_every and (state.step % tc.save_every == 0 or stop):
                save_checkpoint(accelerator, tc.output_dir, state, tc.keep_checkpoints)
            if tc.eval_every and state.step % tc.eval_every == 0 and not stop:
                run_eval()
                clock = time.time()
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    run_eval()
    return state


def finish_run(accelerator: Accelerator) -> None:
    """Close the run's trackers, and keep the process group (the CLI leaves it when the command
    ends: `distributed.leave_process_group`).

    Not `Accelerator.end_training`: it also destroys the process group while the run's DDP
    modules still hold it, and the last of them to be freed then tears gloo down in a destructor
    that can deadlock with a worker thread freeing finished collectives (gdb on a hung rank:
    `~Reducer` -> `~ProcessGroupGloo` joining a worker that waits for the GIL in
    `AsyncBarrierWork` -> `AsyncAllgatherWork` -> `decref_pyobject`).
    """
    for tracker in accelerator.trackers:
        tracker.finish()


def write_summary(
    accelerator: Accelerator, model: torch.nn.Module, final: Path, state: TrainerState
) -> None:
    """<run>/final/eval.json: steps, time, processes, the precision trained in (`run_precision`:
    "no" where a CPU without native bf16 turned a recipe's bf16 into float32), replica drift and
    the last evaluation."""
    drift = replica_max_abs_diff(accelerator, model)  # a collective: every rank calls it
    if accelerator.is_main_process:
        summary: dict[str, Any] = {
            "step": state.step,
            "elapsed_s": round(state.elapsed_s, 1),
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": str(accelerator.mixed_precision),
            "replica_max_abs_diff": drift,
        }
        evals = read_metrics(final.parent, kind="eval")
        if evals:
            summary.update({k: v for k, v in evals[-1].items() if k not in ("kind", "time")})
        write_text(final / "eval.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
