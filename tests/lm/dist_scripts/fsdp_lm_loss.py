"""The stage-two loss under FSDP on 2 CPU processes (gloo), against one unsharded process.

Run by tests/lm/test_fsdp.py with `accelerate launch --multi_gpu --num_processes 2` (torchrun, no
GPU). LMWithLoss (the module the trainer wraps: `lm_loss` inside `forward`) is sharded the way
Accelerate's FSDP plugin shards a GPT-2 (every GPT2Block, then the root, whose group holds the
tied embedding / output layer), each rank takes its half of the global batch with the
normalizer of the whole batch, and the loss and every gradient must equal those of the same
model unsharded over the whole batch in this process. Every (mode, strategy) pair runs in one
launch (a launch costs more than the step). Usage: fsdp_lm_loss.py MODES STRATEGIES OUT
  MODES       comma-separated: split | full (the loss)
  STRATEGIES  comma-separated: fsdp2 (fully_shard, reshard after forward) | fsdp2-keep (root kept
              unsharded) | fsdp1-full (FULL_SHARD) | fsdp1-grad-op (SHARD_GRAD_OP)
Writes {"loss": [local, reference], "max_grad_diff": ..., "max_grad": ...} to
OUT.MODE.STRATEGY.RANK.json for each pair.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import signal
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from vqgpt.distributed import leave_process_group
from vqgpt.lm.loss import LMWithLoss

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the tests' timeout dumps stacks
modes, strategies, out = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
OFF, K, B, T = 40, 24, 4, 12  # text ids [0, 40), image ids [40, 64), global batch 4 x 12 tokens


def compare(mode: str, strategy: str) -> dict:
    """One sharded step against the unsharded reference: the record this rank writes."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=T,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    reference = LMWithLoss(GPT2LMHeadModel(config), mode, OFF, K)
    model = copy.deepcopy(reference)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, OFF + K, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    weights = torch.rand(B, T, generator=gen) + 0.5
    mask = torch.ones_like(ids)
    total_weight = float((weights[:, 1:] * (labels[:, 1:] != -100)).sum())

    if strategy.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        reshard = strategy == "fsdp2"
        for block in model.lm.transformer.h:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        sharding = (
            ShardingStrategy.FULL_SHARD
            if strategy == "fsdp1-full"
            else (ShardingStrategy.SHARD_GRAD_OP)
        )
        model = FSDP(
            model,
            sharding_strategy=sharding,
            auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )

    rows = slice(rank * B // world, (rank + 1) * B // world)
    local = model(ids[rows], mask[rows], labels[rows], weights[rows], total_weight / world)
    local.loss.backward()
    ref = reference(ids, mask, labels, weights, total_weight)
    ref.loss.backward()

    summed = local.loss.detach().clone()
    dist.all_reduce(summed)  # sum over ranks of S_r / (W / world) = world * global mean
    diffs, biggest = [], []
    named = dict(reference.named_parameters())
    if strategy.startswith("fsdp2"):
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor()  # DTensor shard -> whole, on every rank
            diffs.append(float((grad - named[name].grad).abs().max()))
            biggest.append(float(named[name].grad.abs().max()))
    else:
        with FSDP.summon_full_params(model, with_grads=True):
            for name, param in model.named_parameters():
                clean = name.replace("_fsdp_wrapped_module.", "")
                diffs.append(float((param.grad - named[clean].grad).abs().max()))
                biggest.append(float(named[clean].grad.abs().max()))
    return {
        "loss": [float(summed) / world, float(ref.loss)],
        "max_grad_diff": max(diffs),
        "max_grad": max(biggest),
        "params": len(diffs),
    }


for mode in modes:
    for strategy in strategies:
        with open(f"{out}.{mode}.{strategy}.{rank}.json", "w") as fh:
            json.dump(compare(mode, strategy), fh)
leave_process_group()  # barrier + os._exit: no gloo teardown (see its docstring)
