"""Stage one: the Accelerate training loop of the VQ-VAE image tokenizer."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import skip_first_batches
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from .config import QuantizerConfig, load_config, save_config
from .data import DataConfig, collate, image_text_dataset
from .evaluate import EvalConfig, evaluate_tokenizer
from .losses import LossConfig, VQLoss
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
    save_final,
    warmup_cosine,
)
from .vqvae import VQVAE, ModelConfig, VQVAEConfig


@dataclass
class TokenizerRecipe:
    """Everything `vqgpt train-tokenizer` reads from configs/tokenizer/*.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            self.data.image_size = self.model.image_size  # one source of truth: the model


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> TokenizerRecipe:
    """Read a tokenizer recipe YAML with dotted overrides."""
    return load_config(TokenizerRecipe, path, overrides)


def train_tokenizer(recipe: TokenizerRecipe, resume: str | None = None) -> Path:
    """Train (or resume) a VQ-VAE; returns the <run>/final folder."""
    tc = recipe.train
    set_seed(tc.seed)
    accelerator = build_accelerator(tc)
    out = Path(tc.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(recipe, out / "config.yaml")
    if tc.log_with:
        accelerator.init_trackers("vqgpt-tokenizer")

    train_set = image_text_dataset(recipe.data, recipe.data.train_split, train=True)
    if train_set.stats.total:
        accelerator.print(f"train data: {train_set.stats}")
    if len(train_set) < tc.batch_size * accelerator.num_processes:
        raise ValueError(
            f"train split has {len(train_set)} usable images, fewer than one batch "
            f"({tc.batch_size} x {accelerator.num_processes} processes)"
        )
    loader = DataLoader(
        train_set,
        batch_size=tc.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=recipe.data.num_workers,
    )

    model = VQVAE(VQVAEConfig.build(recipe.model, recipe.quantizer))
    loss_fn = VQLoss(recipe.loss)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.learning_rate, betas=tc.betas, weight_decay=tc.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    disc_optimizer = None
    if loss_fn.discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            loss_fn.discriminator.parameters(), lr=tc.learning_rate, betas=(0.5, 0.9)
        )
        loss_fn.discriminator, disc_optimizer = accelerator.prepare(
            loss_fn.discriminator, disc_optimizer
        )
    loss_fn.to(accelerator.device)
    raw_model: VQVAE = accelerator.unwrap_model(model)

    metrics = MetricsLog(accelerator, out)
    state = TrainerState()
    checkpoint = resolve_resume(out, resume)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        metrics.truncate_after(state.step)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume is not None:
        accelerator.print(f"--resume {resume}: no checkpoint in {out}, starting fresh")

    eval_set = None
    if accelerator.is_main_process and recipe.eval.max_images > 0:
        eval_set = image_text_dataset(recipe.data, recipe.data.eval_split, train=False)

    def run_eval() -> None:
        if eval_set is not None and len(eval_set):
            result = evaluate_tokenizer(
                raw_model,
                eval_set,
                recipe.eval,
                grid_path=out / "samples" / f"recon_{state.step:06d}.png",
            )
            metrics.log(state.step, result.to_log(), kind="eval")
            bar.write(f"step {state.step}: " + result.summary())
        accelerator.wait_for_everyone()

    bar = progress_bar(accelerator, tc.max_steps, state.step, "tokenizer")
    start = time.time() - state.elapsed_s
    model.train()
    stop = state.step >= tc.max_steps
    running: dict[str, float] = {}
    while not stop:
        loader.set_epoch(state.epoch)
        batches = (
            skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        )
        for batch in batches:
            state.batches_in_epoch += 1
            pixels = batch["pixel_values"]
            with accelerator.accumulate(model):
                output = model(pixels)
                record = loss_fn.autoencoder_loss(
                    pixels,
                    output.reconstruction,
                    output.quantizer.loss,
                    state.step,
                    raw_model.last_layer,
                )
                accelerator.backward(record.total)
                if accelerator.sync_gradients and tc.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if disc_optimizer is not None and loss_fn.uses_discriminator(state.step):
                    disc_record = loss_fn.discriminator_loss(
                        pixels, output.reconstruction.detach(), state.step
                    )
                    disc_optimizer.zero_grad(set_to_none=True)  # drop the generator step's grads
                    accelerator.backward(disc_record.total)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    record.parts.update(disc_record.parts)
            for key, value in record.to_log().items():
                running[key] = running.get(key, 0.0) + value
            running["perplexity"] = running.get("perplexity", 0.0) + float(
                output.quantizer.perplexity
            )
            running["_n"] = running.get("_n", 0.0) + 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            state.elapsed_s = time.time() - start
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                n = running.pop("_n")
                values = {k: v / n for k, v in running.items()}
                values["lr"] = scheduler.get_last_lr()[0]
                values["elapsed_s"] = round(state.elapsed_s, 1)
                metrics.log(state.step, values)
                bar.set_postfix(loss=f"{values.get('total', math.nan):.4f}")
                running = {}
                stop = out_of_time(accelerator, tc.max_minutes, state.elapsed_s)
            stop = stop or state.step >= tc.max_steps
            if tc.save_every and (state.step % tc.save_every == 0 or stop):
                save_checkpoint(accelerator, out, state, tc.keep_checkpoints)
            if tc.eval_every and state.step % tc.eval_every == 0 and not stop:
                run_eval()
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()

    run_eval()
    drift = replica_max_abs_diff(accelerator, model)
    final = save_final(accelerator, model, out)
    if accelerator.is_main_process:
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
    accelerator.end_training()
    return final
