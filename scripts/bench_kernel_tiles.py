"""Tile sizes of the Triton nearest-code kernel against the chunked search, per code dim, on CUDA:
what `vqgpt.tokenizer.kernels.default_blocks` and `quantize.KERNEL_MAX_DIM` were set from.

    python scripts/bench_kernel_tiles.py            # N=65,536, K=16,384, D in 8..256 (one GPU)

Prints a table: best of 5 timed calls after one warm-up (which compiles), in ms, and the share of
rows whose code equals the chunked search's.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vqgpt.tokenizer.kernels import default_blocks, nearest_code_triton
from vqgpt.tokenizer.quantize import nearest_code

TILES = [
    None,
    (64, 64, 16),
    (64, 64, 32),
    (64, 64, 64),
    (128, 64, 32),
    (64, 128, 32),
    (128, 128, 32),
]


def best_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=65_536)
    parser.add_argument("--k", type=int, default=16_384)
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel_tiles.py needs a CUDA GPU")
    print(f"nearest-code tiles on {torch.cuda.get_device_name()}: N={args.n}, K={args.k}")
    print("\n| D | tiles (N, K, D) | kernel (ms) | chunked (ms) | vs chunked | = chunked |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for d in args.dims:
        x = torch.randn(args.n, d, generator=g).cuda()
        e = torch.randn(args.k, d, generator=g).cuda()
        ref = nearest_code(x, e, 256, backend="chunked")
        chunked = best_ms(lambda x=x, e=e: nearest_code(x, e, 256, backend="chunked"), args.repeats)
        for tiles in TILES:
            name = f"{default_blocks(d)} (default)" if tiles is None else str(tiles)
            try:
                same = (nearest_code_triton(x, e, blocks=tiles) == ref).float().mean().item()
                ms = best_ms(
                    lambda x=x, e=e, t=tiles: nearest_code_triton(x, e, blocks=t), args.repeats
                )
            except Exception as err:  # tiles that do not fit this GPU
                print(f"| {d} | {name} | failed: {type(err).__name__} | | | |")
                continue
            print(f"| {d} | {name} | {ms:.2f} | {chunked:.2f} | {chunked / ms:.2f}x | {same:.5f} |")


if __name__ == "__main__":
    main()
