"""Keep freed large blocks in the process heap on Linux (glibc), so CPU training steps stop paying
page faults for their biggest tensors.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by its own rule) with a
fresh `mmap` and gives it back with `munmap` when freed, so the next step's tensor of the same
size starts on unmapped pages: the kernel faults in and zeroes every 4 KiB page again. A CPU
training step allocates several such tensors per micro-batch (the LM's output-layer gradient: the
~51k x C vocabulary, 51 MiB in float32 at C = 256; its bf16 copy; the embedding's dense
gradient). `mallopt(M_MMAP_THRESHOLD)` and `mallopt(M_TRIM_THRESHOLD)` at 1 GiB keep them in the
heap and reuse them, which is what PyTorch's CPU performance tuning guide gets by preloading
jemalloc or tcmalloc ("Switch Memory allocator"; `torch.backends.xeon.run_cpu` does it with
jemalloc's `dirty_decay_ms` / `muzzy_decay_ms` set to never give memory back). The cost is the
same: the process keeps its high-water mark of resident memory instead of returning freed blocks.

Measured (docs/benchmarks.md, "CPU training: freed memory kept"): `scripts/bench_lm.py` at the
stories recipe's shapes (mini, 8 x 384 tokens, bf16), 2,330 -> 3,136 tokens/s, and the LM recipes
as they train on 2 cores ~1.3x the tokens per second, at the same losses bit for bit. It changes
no number a run computes, only where memory comes from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free top kept

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to `KEEP_BYTES` for this process (once; later calls
    return the first answer). True when applied; False, silently, where there is no glibc (macOS,
    Windows, musl) or `mallopt` refuses. Process-wide and not undone: call it in a process that
    trains. Never raises."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library by that name, or not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    if not ok:
        logger.debug("mallopt refused the thresholds; the allocator is left as it was")
    _applied = ok
    return ok


__all__ = ["KEEP_BYTES", "keep_freed_memory"]
