"""Processes: how vqgpt sets up several of them (gloo on the CPU, NCCL on GPUs) under Accelerate."""

from __future__ import annotations

import os

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
