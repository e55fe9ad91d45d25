"""Stage two: the Accelerate training loop of the GPT-2 over the joint text + image vocabulary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .config import ConfigError, load_config, save_config
from .lm import LMConfig, build_lm, flops_per_token, forward_hidden, lm_loss, peak_flops
from .lm_data import ExampleBank, epoch_batches
from .lm_eval import LMEvalConfig, evaluate_lm
from .pipeline import save_pipeline
from .pretokenize import PretokenizeConfig, pretokenize
from .sequences import SequenceConfig
from .training import (
    MetricsLog,
    TrainConfig,
    TrainerState,
    build_accelerator,
    load_checkpoint,
    out_of_time,
    progress_bar,
    read_metrics,
    replica_max_abs_diff,
    resolve_resume,
    save_checkpoint,
    warmup_cosine,
)


@dataclass
class LMRecipe:
    """Everything `vqgpt train-lm` reads from configs/lm/*.yaml."""

    data: PretokenizeConfig  # stage-one tokenizer, image dataset, where the codes are cached
    text_tokenizer: str | None = None  # GPT-2 BPE: None = bundled offline files; "gpt2" or a folder
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    model: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/lm"))
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)


def load_lm_recipe(path: str | Path | None, overrides: list[str] | None = None) -> LMRecipe:
    """Read an LM recipe YAML with dotted overrides."""
    return load_config(LMRecipe, path, overrides)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, decay on matrices only, fused where this torch build supports it."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=tc.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=tc.betas)


def train_lm(recipe: LMRecipe, resume: str | None = None) -> Path:
    """Train (or resume) the stage-two GPT-2; returns the <run>/final folder."""
    tc = recipe.train
    set_seed(tc.seed)
    accelerator = build_accelerator(tc)
    out = Path(tc.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(recipe, out / "config.yaml")
    if tc.log_with:
        accelerator.init_trackers("vqgpt-lm")

    pretokenize(recipe.data)  # no work when the codes are cached already
    bank = ExampleBank.load(recipe.data, recipe.data.images.train_split, recipe.text_tokenizer)
    layout, seq = bank.layout, recipe.sequences
    seq.check_fits(layout)
    eval_bank = None
    if accelerator.is_main_process and recipe.eval.max_images > 0:
        eval_bank = ExampleBank.load(
            recipe.data, recipe.data.images.eval_split, recipe.text_tokenizer, bank.tokenizer
        )

    model = build_lm(recipe.model, layout.vocab_size, seq.max_length)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    metrics = MetricsLog(accelerator, out)
    state = TrainerState()
    checkpoint = resolve_resume(out, resume)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        metrics.truncate_after(state.step)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume is not None:
        accelerator.print(f"--resume {resume}: no checkpoint in {out}, starting fresh")

    flops_token = flops_per_token(raw_model.config, seq.max_length)
    peak = peak_flops(accelerator.device)

    def run_eval() -> None:
        if eval_bank is not None:
            result = evaluate_lm(raw_model, eval_bank, bank, seq, recipe.eval)
            metrics.log(state.step, result.to_log(), kind="eval")
            bar.write(f"step {state.step}: " + result.summary())
        accelerator.wait_for_everyone()

    bar = progress_bar(accelerator, tc.max_steps, state.step, "lm")
    start = time.time() - state.elapsed_s
    model.train()
    stop = state.step >= tc.max_steps
    running: dict[str, float] = {}
    tokens_since, clock = 0, time.time()
    while not stop:
        batches = epoch_batches(
            bank,
            seq,
            epoch=state.epoch,
            batch_size=tc.batch_size,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        if not batches.batches:
            raise ConfigError(
                f"one epoch of {len(bank)} examples packs into fewer windows than one batch of "
                f"{tc.batch_size} x {accelerator.num_processes} processes: lower train.batch_size"
            )
        if state.epoch == 0 and state.batches_in_epoch == 0 and batches.skipped:
            accelerator.print(f"sequences: {batches.skipped} example(s) too long, skipped")
        for batch in batches.batches[state.batches_in_epoch :]:
            state.batches_in_epoch += 1
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                hidden = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
                with accelerator.autocast():  # the output layer is most of the compute: bf16 too
                    loss = lm_loss(
                        hidden,
                        raw_model.lm_head.weight,
                        batch["labels"],
                        batch["loss_weights"],
                        recipe.model.loss,
                        layout.image_offset,
                        layout.codebook_size,
                    )
                accelerator.backward(loss.loss)
                if accelerator.sync_gradients and tc.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_since += int(batch["attention_mask"].sum()) * accelerator.num_processes
            for key, value in (
                ("loss", loss.loss),
                ("image_loss", loss.image_loss),
                ("text_loss", loss.text_loss),
            ):
                running[key] = running.get(key, 0.0) + float(value.detach())
            running["_n"] = running.get("_n", 0.0) + 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            state.elapsed_s = time.time() - start
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                n = running.pop("_n")
                values = {k: v / n for k, v in running.items()}
                seconds = max(time.time() - clock, 1e-9)
                values["tokens_per_s"] = tokens_since / seconds
                if peak:
                    values["mfu"] = (
                        values["tokens_per_s"] * flops_token / (peak * accelerator.num_processes)
                    )
                values["lr"] = scheduler.get_last_lr()[0]
                values["elapsed_s"] = round(state.elapsed_s, 1)
                metrics.log(state.step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
                running, tokens_since, clock = {}, 0, time.time()
                stop = out_of_time(accelerator, tc.max_minutes, state.elapsed_s)
            stop = stop or state.step >= tc.max_steps
            if tc.save_every and (state.step % tc.save_every == 0 or stop):
                save_checkpoint(accelerator, out, state, tc.keep_checkpoints)
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
    drift = replica_max_abs_diff(accelerator, model)
    final = out / "final"
    if accelerator.is_main_process:
        save_pipeline(final, raw_model, bank.tokenizer, bank.image_tokenizer_dir)
        summary = {
            "step": state.step,
            "elapsed_s": round(state.elapsed_s, 1),
            "num_processes": accelerator.num_processes,
            "replica_max_abs_diff": drift,
        }
        evals = read_metrics(out, kind="eval")
        if evals:
            summary.update({k: v for k, v in evals[-1].items() if k not in ("kind", "time")})
        (final / "eval.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


__all__ = ["LMRecipe", "build_optimizer", "load_lm_recipe", "train_lm"]
