"""Stage two trained under FSDP2 on 2 CPU processes: checkpoints sharded and full, resume, the
final pipeline; against one unsharded process over the same global batches.

Run by tests/lm/test_fsdp.py with `accelerate launch --multi_gpu --num_processes 2` (torchrun,
gloo). The trainer's own parts: `build_accelerator`, `build_lm` (the vocabulary sized before
wrapping, tied embeddings), `LMWithLoss`, `build_optimizer`, `warmup_cosine`, and `gather_lm`
+ `save_pipeline` for the final folder. The model is sharded the way Accelerate's FSDP plugin
shards a GPT-2 under configs/accelerate/multi_node_fsdp.yaml (every GPT2Block, then the root,
resharded after forward). Checkpoints use torch's distributed state-dict API, which Accelerate's
FSDP `save_state` calls: sharded (torch.distributed.checkpoint, one file per rank) and full
(gathered to rank 0). Usage: [FSDP_STEPS=6] fsdp_lm_train.py TOKENIZER_FOLDER OUT
(checkpoints at step FSDP_STEPS // 2). Writes OUT/result.json (rank 0) and the pipeline OUT/final.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from vqgpt.distributed import leave_process_group
from vqgpt.lm.loss import LMWithLoss
from vqgpt.lm.model import LMConfig, build_lm
from vqgpt.lm.pipeline import save_pipeline
from vqgpt.lm.train import gather_lm
from vqgpt.lm.vocab import JointTokenizer
from vqgpt.tokenizer.vqvae import VQVAE
from vqgpt.training import TrainConfig, build_accelerator, build_optimizer, warmup_cosine

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the tests' timeout dumps stacks
image_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
STEPS = int(os.environ.get("FSDP_STEPS", "6"))  # scripts/bench_processes.py asks for 50
SAVE_AT, B, T, N_POSITIONS = STEPS // 2, 4, 24, 80
tc = TrainConfig(
    output_dir=str(out), learning_rate=3e-3, warmup_steps=2, max_steps=STEPS, weight_decay=0.1
)
accelerator = build_accelerator(tc)
rank, world = accelerator.process_index, accelerator.num_processes
image_tokenizer = VQVAE.from_pretrained(image_dir)
tokenizer = JointTokenizer.build(image_tokenizer.codebook_size, image_tokenizer.grid)
layout = tokenizer.layout
rows = slice(rank * B // world, (rank + 1) * B // world)


def fresh_model() -> LMWithLoss:
    torch.manual_seed(0)
    lm = build_lm(LMConfig(preset="tiny", n_layer=2), layout.vocab_size, N_POSITIONS)
    lm.config.t2i_prefix_length = 8
    return LMWithLoss(lm, "split", layout.image_offset, layout.codebook_size)


def shard(model: LMWithLoss) -> LMWithLoss:
    mesh = init_device_mesh("cpu", (world,))
    for block in model.lm.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of optimizer step `step` (1-based): ids over the whole joint vocabulary."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, layout.vocab_size, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    weights = torch.rand(B, T, generator=gen) + 0.5
    return {"ids": ids, "mask": torch.ones_like(ids), "labels": labels, "weights": weights}


def train(model, optimizer, scheduler, steps, sharded: bool) -> list[list[float]]:
    """[loss, lr] per optimizer step; the loss is the global weighted mean."""
    log = []
    for step in steps:
        b = batch(step)
        weight = float((b["weights"][:, 1:] * (b["labels"][:, 1:] != -100)).sum())
        pick = rows if sharded else slice(None)
        parts = [b[k][pick] for k in ("ids", "mask", "labels", "weights")]
        result = model(*parts, weight / world if sharded else weight)
        result.loss.backward()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total = result.weighted_sum.detach().clone()
        if sharded:
            dist.all_reduce(total)
        log.append([float(total) / weight, lr])
    return log


def setup(sharded: bool):
    model = shard(fresh_model()) if sharded else fresh_model()
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    return model, optimizer, scheduler


# one unsharded process over the whole global batch
ref_model, ref_opt, ref_sched = setup(sharded=False)
reference = train(ref_model, ref_opt, ref_sched, range(1, STEPS + 1), sharded=False)

# FSDP2: the first steps, both checkpoints, the rest
model, optimizer, scheduler = setup(sharded=True)
clock = time.perf_counter()
first = train(model, optimizer, scheduler, range(1, SAVE_AT + 1), sharded=True)
fsdp_s_per_step = (time.perf_counter() - clock) / SAVE_AT
model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded (DTensor) state
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "sharded"))
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
full_model_sd, full_optim_sd = get_state_dict(model, optimizer, options=full)
if rank == 0:
    torch.save({"model": full_model_sd, "optim": full_optim_sd}, out / "full.pt")
schedule_sd = scheduler.state_dict()
rest = train(model, optimizer, scheduler, range(SAVE_AT + 1, STEPS + 1), sharded=True)

# resume from the sharded checkpoint: a fresh model and optimizer, each rank reads its shards
model2, optimizer2, scheduler2 = setup(sharded=True)
m_sd, o_sd = get_state_dict(model2, optimizer2)
state = {"model": m_sd, "optim": o_sd}
dcp.load(state, checkpoint_id=str(out / "sharded"))
set_state_dict(model2, optimizer2, model_state_dict=state["model"], optim_state_dict=state["optim"])
scheduler2.load_state_dict(schedule_sd)
resumed_sharded = train(model2, optimizer2, scheduler2, range(SAVE_AT + 1, STEPS + 1), True)

# resume from the full checkpoint: every rank reads the gathered file and keeps its shards
model3, optimizer3, scheduler3 = setup(sharded=True)
saved = torch.load(out / "full.pt", weights_only=False)
set_state_dict(
    model3,
    optimizer3,
    model_state_dict=saved["model"],
    optim_state_dict=saved["optim"],
    options=StateDictOptions(full_state_dict=True),
)
scheduler3.load_state_dict(schedule_sd)
resumed_full = train(model3, optimizer3, scheduler3, range(SAVE_AT + 1, STEPS + 1), True)

# the final pipeline, the trainer's way: gather the shards to a plain GPT-2 on rank 0
plain = gather_lm(accelerator, model)
if rank == 0:
    save_pipeline(out / "final", plain, tokenizer, image_dir)
    ref_state = ref_model.lm.state_dict()
    weight_diff = max(float((v - ref_state[k]).abs().max()) for k, v in plain.state_dict().items())
    record = {
        "reference": reference,
        "fsdp": first + rest,
        "resumed_sharded": resumed_sharded,
        "resumed_full": resumed_full,
        "max_weight_diff": weight_diff,
        "fsdp_s_per_step": fsdp_s_per_step,
        "shard_files": sorted(p.name for p in (out / "sharded").iterdir()),
    }
    (out / "result.json").write_text(json.dumps(record, indent=1))
leave_process_group()  # barrier + os._exit: no gloo teardown (see its docstring)
