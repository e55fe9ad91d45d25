"""Processes: how vqgpt sets up several of them (gloo on the CPU, NCCL on GPUs) under Accelerate."""

from __future__ import annotations

import logging
import os
import sys

import torch
from accelerate import PartialState


def multi_cpu_run() -> bool:
    """Several processes and no GPU (`accelerate launch --multi_gpu` on a CPU machine).

    Accelerate sets up gloo for such a run only when told it is on the CPU (`cpu=True`).
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> PartialState:
    """This process's place among the launched ones (rank, world size, device)."""
    return PartialState(cpu=multi_cpu_run())


def leave_process_group() -> None:
    """End a launched process: wait for every rank, then exit at once (`os._exit(0)`), without
    tearing the gloo process group down. Does nothing when no process group is set up.

    Tearing the group down (Accelerate's `end_training`, `destroy_process_group`, or the
    interpreter's exit) can deadlock or abort: `~ProcessGroupGloo` joins its worker threads while
    holding the GIL, and a worker freeing a finished collective that holds Python tensors waits for
    the GIL (gdb: `AsyncBarrierWork` -> `AsyncAllgatherWork` -> `decref_pyobject`; pytorch/pytorch
    #190489 describes the same race); at interpreter exit the same race ends in
    `terminate called without an active exception` (SIGABRT). Past the barrier nothing is left to
    communicate and every file is written, so the process ends here with streams and logs flushed.
    Used by the CLI after every command and by the multi-process test scripts.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
