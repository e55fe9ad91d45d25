"""Benchmark: chunked nearest-code search vs the seed's full-matrix search (time, peak memory).

    python scripts/bench_quantizer.py            # N=65,536, K in {1024, 16384}, D in {8, 256}
    python scripts/bench_quantizer.py --quick    # a small smoke run
    python scripts/bench_quantizer.py --chunk-sizes 512 2048 8192   # tune the chunk size

CPU: every (case, method) runs in a fresh subprocess; peak extra memory = VmHWM - VmRSS, with the
high-water mark reset (/proc/self/clear_refs) after the inputs are allocated and a warm-up ran, so
it is the peak resident memory the search itself added (score blocks, temporaries, the output).
CUDA (when available): torch.cuda.max_memory_allocated minus the memory allocated before the call.
Time: best (min) of --repeats runs of the whole search: the CPU may be shared, and
contention only ever adds time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vqgpt.tokenizer.quantize import QuantizerConfig, nearest_code, nearest_code_full

MIB = 2**20


@dataclass
class Case:
    """One measurement: a search method on one problem size and device."""

    device: str
    n: int
    k: int
    d: int
    method: str  # "naive" | "chunked"
    chunk: int = 0
    repeats: int = 3


@dataclass
class Result:
    """What one measurement gave (time in seconds, memory in MiB); `note` says why it is empty."""

    case: Case
    seconds: float | None = None
    peak_mib: float | None = None
    codes_path: str | None = None
    note: str = ""


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _search(case: Case, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    if case.method == "naive":
        return nearest_code_full(x, e)
    return nearest_code(x, e, case.chunk)


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.n, case.d, generator=g).to(case.device)
    e = torch.randn(case.k, case.d, generator=g).to(case.device)
    return x, e


def measure_cpu_worker(case: Case, codes_path: str) -> Result:
    """In this (fresh) process: peak RSS added by one search, then the best time of repeats."""
    naive_need = 3 * case.n * case.k * 4 / MIB  # three live [N, K] float32 temporaries
    if case.method == "naive" and naive_need > 0.85 * _mem_available_mib():
        note = f"skipped: needs ~{naive_need:.0f} MiB, {_mem_available_mib():.0f} MiB available"
        return Result(case, note=note)
    x, e = _inputs(case)
    _search(case, x[:256], e)  # warm-up: thread pools, BLAS init
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    rss0 = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    codes = _search(case, x, e)
    times = [time.perf_counter() - start]
    peak_mib = (_proc_status_kib("VmHWM") - rss0) / 1024
    torch.save(codes, codes_path)
    del codes
    for _ in range(case.repeats - 1):
        start = time.perf_counter()
        _search(case, x, e)
        times.append(time.perf_counter() - start)
    return Result(case, min(times), peak_mib, codes_path)


def measure_cuda(case: Case, codes_path: str) -> Result:
    """In process: max_memory_allocated added by one search, then the best time of repeats."""
    x, e = _inputs(case)
    _search(case, x[:256], e)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        codes = _search(case, x, e)
    except torch.OutOfMemoryError:
        return Result(case, note="skipped: CUDA out of memory")
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / MIB
    torch.save(codes.cpu(), codes_path)
    del codes
    times = []
    for _ in range(case.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _search(case, x, e)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return Result(case, min(times), peak_mib, codes_path)


def measure(case: Case, workdir: Path) -> Result:
    """One case: CPU in a fresh subprocess, CUDA in this process."""
    codes_path = str(
        workdir / f"{case.device}_{case.n}_{case.k}_{case.d}_{case.method}_{case.chunk}.pt"
    )
    if case.device == "cuda":
        return measure_cuda(case, codes_path)
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(case)), "--codes", codes_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        return Result(case, note=f"failed: {why}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(Case(**data.pop("case")), **data)


def table(results: list[Result]) -> str:
    """Markdown table; each chunked row is compared with the naive row of the same problem."""
    head = "| device | N | K | D | method | chunk | time (s) | peak extra (MiB) | time / naive | memory / naive | codes = naive |"
    lines = [head, "|" + "---|" * 11]
    naive = {
        (r.case.device, r.case.n, r.case.k, r.case.d): r
        for r in results
        if r.case.method == "naive"
    }
    for r in results:
        c = r.case
        base = naive.get((c.device, c.n, c.k, c.d))
        t_ratio = m_ratio = agree = ""
        if c.method == "chunked" and base is not None and base.seconds and r.seconds:
            t_ratio = f"{r.seconds / base.seconds:.2f}x"
            m_ratio = f"1/{base.peak_mib / max(r.peak_mib, 1e-9):.1f}"
            same = torch.load(r.codes_path) == torch.load(base.codes_path)
            agree = f"{100 * same.float().mean().item():.3f}%"
        time_s = f"{r.seconds:.3f}" if r.seconds is not None else r.note
        mem = f"{r.peak_mib:.1f}" if r.peak_mib is not None else ""
        chunk = str(c.chunk) if c.method == "chunked" else ""
        lines.append(
            f"| {c.device} | {c.n} | {c.k} | {c.d} | {c.method} | {chunk} | {time_s} | {mem} "
            f"| {t_ratio} | {m_ratio} | {agree} |"
        )
    return "\n".join(lines)


def verdicts(results: list[Result], default_chunk: int) -> list[str]:
    """The target: at the largest K, chunked peak <= 1/8 of naive at <= 1.2x its CPU time."""
    lines = []
    k_max = max(r.case.k for r in results)
    by_key = {(r.case.device, r.case.k, r.case.d, r.case.method, r.case.chunk): r for r in results}
    for r in results:
        c = r.case
        if c.device != "cpu" or c.k != k_max or c.method != "chunked" or c.chunk != default_chunk:
            continue
        base = by_key.get(("cpu", c.k, c.d, "naive", 0))
        if base is None or base.seconds is None or r.seconds is None:
            lines.append(f"target (K={c.k}, D={c.d}): not measured ({base and base.note})")
            continue
        mem_ok = r.peak_mib <= base.peak_mib / 8
        time_ok = r.seconds <= 1.2 * base.seconds
        verdict = "MET" if mem_ok and time_ok else "NOT MET"
        lines.append(
            f"target (N={c.n}, K={c.k}, D={c.d}, chunk={c.chunk}): memory "
            f"{r.peak_mib:.0f} vs {base.peak_mib:.0f} MiB (<= 1/8: {mem_ok}), time "
            f"{r.seconds:.2f} vs {base.seconds:.2f} s (<= 1.2x: {time_ok}) -> {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every case, print the table."""
    default_chunk = QuantizerConfig().chunk_size
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="codebook sizes K")
    parser.add_argument("--ds", type=int, nargs="+", default=None, help="vector dims D")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--codes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one CPU measurement in this fresh process
        result = measure_cpu_worker(Case(**json.loads(args.worker)), args.codes)
        print(json.dumps(asdict(result)))
        return

    if args.quick:
        n, ks, ds, chunks, repeats = 2048, [256], [8], args.chunk_sizes or [512], args.repeats or 1
    else:
        n, ks, ds = 65_536, args.ks or [1024, 16_384], args.ds or [8, 256]
        chunks, repeats = args.chunk_sizes or [default_chunk], args.repeats or 3
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for k in ks:
                for d in ds:
                    cases = [Case(device, n, k, d, "naive", 0, repeats)]
                    cases += [Case(device, n, k, d, "chunked", c, repeats) for c in chunks]
                    for case in cases:
                        results.append(measure(case, Path(tmp)))
                        print(f"done: {asdict(results[-1].case)}", file=sys.stderr, flush=True)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
            f"time = best of {repeats} run(s); CPU peak = VmHWM - VmRSS in a fresh process per "
            "row (HWM reset after inputs + warm-up); CUDA peak = max_memory_allocated delta. "
            "The CPU may be shared with other jobs: times are noisy.\n"
        )
        print(table(results))
        if not args.quick:
            for line in verdicts(results, chunks[0]):
                print(line)


if __name__ == "__main__":
    main()
