"""Benchmark: the shipped stage-two training step against plain Hugging Face GPT-2.

    python scripts/bench_lm.py --quick                                # a smoke run (seconds)
    python scripts/bench_lm.py --preset mini --seq-len 256 --batch-size 8 --codebook-size 1024
    python scripts/bench_lm.py --preset small --seq-len 1024 --batch-size 8 --compile   # a GPU

Rows, all on the same batch and the same initial weights:
  plain HF      GPT2LMHeadModel, eager attention, float32, `model(ids, labels=ids).loss` (full
                [B, T, V] logits), torch.optim.AdamW (fused=False), vocabulary not padded
  shipped full  train_lm's step: LMWithLoss (the loss inside the wrapped forward, lm_loss("full"))
                + the builder's AdamW + grad clipping, through Accelerate, SDPA attention,
                vocabulary padded to a multiple of 64
  shipped split the same with lm_loss("split"): image targets over the K image rows only
On CUDA also both shipped rows under bf16 autocast (Accelerate mixed precision); `--compile`
adds torch.compile'd variants of every shipped row.

The batch: random ids with the joint vocabulary's ranges; position 0 is <|endoftext|>, the last
`--image-fraction` of the target positions are image codes, the others text / special ids.
Every row runs in a fresh subprocess (clean allocator, Accelerate state and memory peak).
Tokens/s: B*T over the median step time of the timed steps (after --warmup), synchronised on
CUDA. MFU: tokens/s * flops_per_token (6N + 12LCT, the full-vocabulary head, as train_lm logs it)
over the device's peak (datasheet bf16 peak on a known GPU, --peak-tflops, or else a measured
matmul rate, which the output says). Memory: CUDA max_memory_allocated (absolute, weights
included, peak reset after the model, optimizer and batch exist); CPU the peak resident memory
the training steps added (VmHWM - VmRSS, high-water mark reset at the same point).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

MIB = 2**20
TEXT_VOCAB = 50257  # GPT-2's ids; VocabLayout's default
QUICK = dict(preset="tiny", seq_len=64, batch_size=2, codebook_size=256, steps=2, warmup=1)
FULL = dict(preset="small", seq_len=1024, batch_size=8, codebook_size=16384, steps=10, warmup=3)


@dataclass
class Row:
    """One way to run a training step."""

    name: str
    path: str  # "plain" | "shipped"
    loss: str = "full"  # lm_loss mode of a shipped row
    precision: str = "no"  # Accelerate mixed_precision: "no" | "bf16"
    compile: bool = False
    keep_freed_memory: bool = True  # shipped rows on a CPU: as train.keep_freed_memory


@dataclass
class Job:
    """What a worker process measures: one row on one problem."""

    row: Row
    device: str
    preset: str
    seq_len: int
    batch_size: int
    codebook_size: int
    image_fraction: float
    steps: int
    warmup: int
    seed: int = 0


class Measurement(NamedTuple):
    """What one row gave; `note` says why a number is missing."""

    tokens_per_s: float | None
    flops_per_token: float | None
    peak_mib: float | None
    loss0: float | None
    n_params: int | None
    note: str = ""


def plan_rows(device: str, compile_: bool, cpu_bf16: bool = False) -> list[Row]:
    """The rows to measure on `device`: plain HF, shipped full / split (+ bf16 on CUDA, or on a
    CPU with `cpu_bf16`; + compiled). On a CPU also the split rows with glibc's default
    allocator thresholds (`train.keep_freed_memory=false`), to show what `vqgpt.cpu_memory` buys."""
    shipped = [Row("shipped full", "shipped", "full"), Row("shipped split", "shipped", "split")]
    if device == "cuda" or cpu_bf16:
        shipped += [
            Row("shipped full bf16", "shipped", "full", "bf16"),
            Row("shipped split bf16", "shipped", "split", "bf16"),
        ]
    if compile_:
        shipped += [
            Row(f"{r.name} compiled", r.path, r.loss, r.precision, True) for r in list(shipped)
        ]
    if device == "cpu":
        shipped += [
            Row(f"{r.name}, default malloc", r.path, r.loss, r.precision, r.compile, False)
            for r in list(shipped)
            if r.loss == "split"
        ]
    return [Row("plain HF", "plain"), *shipped]


def make_batch(
    batch_size: int, seq_len: int, codebook_size: int, image_fraction: float, seed: int
) -> torch.Tensor:
    """Input ids [B, T]: <|endoftext|>, text / special ids, then image codes at the end."""
    image_offset = TEXT_VOCAB + 2  # <|boi|>, <|eoi|>
    n_image = round(image_fraction * (seq_len - 1))  # of the T - 1 target positions
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, image_offset, (batch_size, seq_len - 1 - n_image), generator=g)
    codes = torch.randint(0, codebook_size, (batch_size, n_image), generator=g) + image_offset
    eos = torch.full((batch_size, 1), TEXT_VOCAB - 1)
    return torch.cat([eos, text, codes], dim=1)  # (B, T)


# ---------------------------------------------------------------------------------------------
# worker: one row in a fresh process


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(job: Job) -> Measurement:
    """Build the model and optimizer of `job.row`, run warmup + timed steps, measure them."""
    from accelerate import Accelerator

    from vqgpt.cpu_memory import keep_freed_memory
    from vqgpt.lm.loss import LMWithLoss
    from vqgpt.lm.model import LMConfig, build_lm, flops_per_token
    from vqgpt.training import TrainConfig, build_optimizer

    row, device = job.row, torch.device(job.device)
    image_offset = TEXT_VOCAB + 2
    real_vocab = image_offset + job.codebook_size
    torch.manual_seed(job.seed)  # the same initial weights for every row
    model = build_lm(LMConfig(preset=job.preset), real_vocab, job.seq_len)  # shipped: sdpa, padded
    ids = make_batch(
        job.batch_size, job.seq_len, job.codebook_size, job.image_fraction, job.seed
    ).to(device)
    mask = torch.ones_like(ids)

    if row.path == "plain":
        # the same weights without the padding rows (plain HF has no padded vocabulary)
        plain_cfg = LMConfig(preset=job.preset, attn_implementation="eager", pad_vocab_to=1)
        plain = build_lm(plain_cfg, real_vocab, job.seq_len)
        state = model.state_dict()
        state["transformer.wte.weight"] = state["transformer.wte.weight"][:real_vocab]
        state.pop("lm_head.weight", None)  # tied to wte
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
        if plain.lm_head.weight is not plain.transformer.wte.weight:
            raise RuntimeError("plain HF model: lm_head is not tied to wte")
        model = plain.to(device)
        del state
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
        model.train()

        def step() -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

    else:
        if device.type == "cpu" and row.keep_freed_memory:
            keep_freed_memory()  # as build_accelerator does for a CPU run
        tc = TrainConfig(output_dir="unused", mixed_precision=row.precision)
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=row.precision)
        raw = LMWithLoss(model.to(device), row.loss, image_offset, job.codebook_size)
        optimizer = build_optimizer(raw, tc)
        wrapped = torch.compile(raw) if row.compile else raw
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
        wrapped.train()

        def step() -> torch.Tensor:
            out = wrapped(ids, mask, ids)  # as train_lm: the whole loss under autocast
            accelerator.backward(out.loss)
            if tc.grad_clip:
                accelerator.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()

    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model.config, job.seq_len)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        rss0 = _proc_status_kib("VmRSS")
    times, loss0 = [], None
    try:
        for i in range(job.warmup + job.steps):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            if i >= job.warmup:
                times.append(time.perf_counter() - start)
            if i == 0:
                loss0 = float(loss)
    except torch.OutOfMemoryError:
        return Measurement(None, flops, None, loss0, n_params, "out of memory")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MIB
    else:
        peak = (_proc_status_kib("VmHWM") - rss0) / 1024
    tokens_per_s = job.batch_size * job.seq_len / statistics.median(times)
    return Measurement(tokens_per_s, flops, peak, loss0, n_params)


def measure(job: Job) -> Measurement:
    """Run `job` in a fresh subprocess of this script."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        return Measurement(None, None, None, None, None, f"failed: {why}")
    return Measurement(*json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------
# the parent: device, peak rate, table


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with the number of torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return f"CPU {model or 'unknown'} ({torch.get_num_threads()} torch threads)"


def measured_matmul_flops(device: str, n: int) -> float:
    """Best FLOP/s of an [n, n] @ [n, n] matmul here (float32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(torch.device(device))
        start = time.perf_counter()
        a @ b
        _sync(torch.device(device))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def resolve_peak(device: str, override_tflops: float | None, quick: bool) -> tuple[float, str]:
    """The peak FLOP/s MFU is taken against, and where it came from."""
    from vqgpt.lm.model import peak_flops

    if override_tflops is not None:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    datasheet = peak_flops(device)
    if datasheet is not None:
        return datasheet, f"datasheet dense bf16 peak {datasheet / 1e12:.0f} TFLOP/s"
    n = 512 if quick else 2048
    rate = measured_matmul_flops(device, n)
    kind = "bf16" if device == "cuda" else "float32"
    return rate, (
        f"ESTIMATED: no known peak for this device, MFU is against the best measured {kind} "
        f"{n}x{n} matmul here, {rate / 1e9:.1f} GFLOP/s (pass --peak-tflops for a real peak)"
    )


def table(rows: list[Row], results: list[Measurement], peak: float) -> str:
    """Markdown table, one line per row; speed is compared with the plain HF row."""
    head = (
        "| row | attention | precision | loss | compiled | tokens/s | vs plain | MFU "
        "| peak mem (MiB) | loss @ step 0 |"
    )
    lines = [head, "|" + "---|" * 10]
    base = results[0].tokens_per_s
    for row, r in zip(rows, results, strict=True):
        attention = "eager" if row.path == "plain" else "sdpa"
        loss = "HF full logits" if row.path == "plain" else f"lm_loss {row.loss}"
        precision = "fp32" if row.precision == "no" else f"{row.precision} autocast"
        if r.tokens_per_s is None:
            speed = mfu = ratio = r.note
        else:
            speed = f"{r.tokens_per_s:,.0f}"
            mfu = f"{100 * r.tokens_per_s * r.flops_per_token / peak:.2f}%"
            ratio = f"{r.tokens_per_s / base:.2f}x" if base else ""
        mem = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "n/a"
        loss0 = f"{r.loss0:.5f}" if r.loss0 is not None else "n/a"
        compiled = "yes" if row.compile else "no"
        lines.append(
            f"| {row.name} | {attention} | {precision} | {loss} | {compiled} | {speed} | {ratio} "
            f"| {mfu} | {mem} | {loss0} |"
        )
    return "\n".join(lines)


def loss_check(results: list[Measurement], rtol: float = 1e-4) -> str:
    """Whether plain HF and shipped full agree at step 0 (same batch, same weights)."""
    a, b = results[0].loss0, results[1].loss0
    if a is None or b is None:
        return "loss check: n/a (a row failed)"
    ok = abs(a - b) <= rtol * abs(a)
    verdict = "agree" if ok else "DISAGREE"
    return f"loss check (step 0): plain HF {a:.6f} vs shipped full {b:.6f} -> {verdict}"


def split_note(rows: list[Row], results: list[Measurement], peak: float, job: Job) -> str:
    """The split head's share of the full head's FLOPs, and split MFU on the FLOPs it does."""
    from vqgpt.lm.model import LM_PRESETS, round_up

    split = next((r for row, r in zip(rows, results, strict=True) if row.name == "shipped split"))
    if split.tokens_per_s is None:
        return "split FLOPs: n/a (the row failed)"
    n_embd = LM_PRESETS[job.preset]["n_embd"]
    image_offset = TEXT_VOCAB + 2
    f = round(job.image_fraction * (job.seq_len - 1)) / (job.seq_len - 1)
    head_full = 6.0 * n_embd * round_up(image_offset + job.codebook_size, 64)
    head_split = 6.0 * n_embd * ((1 - f) * image_offset + f * job.codebook_size)
    flops = split.flops_per_token - head_full + head_split
    return (
        f"split FLOPs: MFU above counts the full-vocabulary head (flops_per_token); the split "
        f"head does {100 * head_split / head_full:.0f}% of its FLOPs here (image targets over "
        f"K rows), {flops / split.flops_per_token:.2f}x the model FLOPs per token in all: "
        f"{100 * split.tokens_per_s * flops / peak:.2f}% MFU on the FLOPs actually done"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure every row in its own process, print the table."""
    from vqgpt.lm.model import LM_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(LM_PRESETS), default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--codebook-size", type=int, default=None, help="K image codes")
    parser.add_argument("--image-fraction", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd rows")
    parser.add_argument(
        "--bf16", action="store_true", help="on a CPU too: bf16 autocast rows (CUDA has them)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one row in this fresh process
        data = json.loads(args.worker)
        job = Job(row=Row(**data.pop("row")), **data)
        print(json.dumps(run_job(job)))
        return

    sizes = {k: getattr(args, k) for k in FULL}
    sizes = {
        k: v if v is not None else (QUICK if args.quick else FULL)[k] for k, v in sizes.items()
    }
    if not 0.0 <= args.image_fraction <= 1.0:
        parser.error(f"--image-fraction must be in [0, 1], got {args.image_fraction}")
    if min(sizes["seq_len"], sizes["batch_size"], sizes["codebook_size"], sizes["steps"]) < 1:
        parser.error("--seq-len, --batch-size, --codebook-size and --steps must be positive")
    if sizes["warmup"] < 0:
        parser.error(f"--warmup must be >= 0, got {sizes['warmup']}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")

    rows = plan_rows(device, args.compile, args.bf16)
    jobs = [Job(row, device, image_fraction=args.image_fraction, **sizes) for row in rows]
    results = []
    for row, job in zip(rows, jobs, strict=True):
        results.append(measure(job))
        print(f"done: {row.name}", file=sys.stderr, flush=True)
    peak, peak_source = resolve_peak(device, args.peak_tflops, args.quick)

    vocab = TEXT_VOCAB + 2 + sizes["codebook_size"]
    n_params = results[1].n_params  # the shipped model (vocabulary padded)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(
        f"model: preset {sizes['preset']} ({n_params or 0:,} parameters with the tied head), "
        f"vocab {vocab:,} (K={sizes['codebook_size']}), B={sizes['batch_size']}, "
        f"T={sizes['seq_len']}, image fraction {args.image_fraction:g}; "
        f"median of {sizes['steps']} step(s) after {sizes['warmup']} warm-up"
    )
    print(f"peak for MFU: {peak_source}")
    memory = (
        "max_memory_allocated (absolute)"
        if device == "cuda"
        else "peak RSS the training steps added (VmHWM delta, weights and batch excluded)"
    )
    print(f"memory: {memory}; shipped rows include grad clipping (train.grad_clip=1.0)\n")
    print(table(rows, results, peak))
    print()
    print(split_note(rows, results, peak, jobs[0]))
    print(loss_check(results))


if __name__ == "__main__":
    main()
