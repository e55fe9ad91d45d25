"""Benchmark: nearest-code search, full matrix vs chunked vs the fused Triton kernel.

    python scripts/bench_nearest_code.py                 # CUDA: N=65,536, K=16,384, D in {8, 256}
    python scripts/bench_nearest_code.py --quick         # CPU smoke run (Triton interpreted)

Methods: `full` builds the [N, K] distance matrix (the seed's search); `chunked` is
`vqgpt.tokenizer.quantize.nearest_code` forced to its chunked path; `triton` is the exact float32 kernel,
`triton-fast` its tf32 top-2 + exact re-rank variant (`vqgpt.tokenizer.kernels`). Time: best of --repeats,
synchronised. Extra memory: CUDA max_memory_allocated minus what was allocated before the call;
on the CPU the growth of the peak resident set (VmHWM, reset before each call), a rough figure
since freed blocks are reused. Identical: % of indices equal to the chunked search's and the full
matrix's. On the CPU the kernel runs under TRITON_INTERPRET=1 (set here before triton loads), so
its CPU time says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

MIB = 2**20
METHODS = ("full", "chunked", "triton", "triton-fast")


def search(method: str, x: torch.Tensor, e: torch.Tensor, chunk: int) -> torch.Tensor:
    """One search by `method`."""
    from vqgpt.tokenizer.quantize import nearest_code, nearest_code_full

    if method == "full":
        return nearest_code_full(x, e)
    if method == "chunked":
        return nearest_code(x, e, chunk, backend="chunked")
    from vqgpt.tokenizer.kernels import nearest_code_triton

    return nearest_code_triton(x, e, fast=method == "triton-fast")


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(
    method: str, x: torch.Tensor, e: torch.Tensor, chunk: int, repeats: int
) -> tuple[float, float, torch.Tensor]:
    """(best seconds, extra MiB, codes) of one method."""
    cuda = x.is_cuda
    search(method, x[:256], e, chunk)  # warm-up: kernel compilation, BLAS init
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _vm_kib("VmRSS") * 1024
    codes = search(method, x, e, chunk)
    if cuda:
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        extra = (_vm_kib("VmHWM") * 1024 - base) / MIB
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        search(method, x, e, chunk)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), extra, codes.cpu()


def run(device: str, n: int, k: int, ds: list[int], repeats: int, chunk: int) -> list[str]:
    """Markdown rows, one per (D, method)."""
    rows = []
    for d in ds:
        g = torch.Generator().manual_seed(d)
        x = torch.randn(n, d, generator=g).to(device)
        e = torch.randn(k, d, generator=g).to(device)
        results = {m: measure(m, x, e, chunk, repeats) for m in METHODS}
        ref_chunked, ref_full = results["chunked"][2], results["full"][2]
        for method, (seconds, extra, codes) in results.items():
            same_c = 100 * (codes == ref_chunked).float().mean().item()
            same_f = 100 * (codes == ref_full).float().mean().item()
            speed = results["chunked"][0] / seconds
            rows.append(
                f"| {device} | {n} | {k} | {d} | {method} | {seconds * 1e3:.2f} | {speed:.2f}x "
                f"| {extra:.1f} | {same_c:.3f}% | {same_f:.3f}% |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run (interpreted kernel)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs; best is reported")
    args = parser.parse_args(argv)
    if args.quick:
        device, n, k, ds, repeats = "cpu", 300, 200, [8, 40], args.repeats or 1
    else:
        if not torch.cuda.is_available():
            parser.error("the full benchmark needs CUDA; use --quick on the CPU")
        device, n, k, ds, repeats = "cuda", 65_536, 16_384, [8, 256], args.repeats or 5
    if device == "cpu":
        # before anything imports triton (vqgpt's modules import transformers, which does)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from vqgpt.tokenizer.quantize import QuantizerConfig

    chunk = QuantizerConfig().chunk_size
    rows = run(device, n, k, ds, repeats, chunk)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreted)"
    print(f"nearest code on {name}: chunk={chunk}, best of {repeats}, torch {torch.__version__}\n")
    print(
        "| device | N | K | D | method | time (ms) | speed vs chunked | extra memory (MiB) "
        "| = chunked | = full |"
    )
    print("|" + "---|" * 10)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
