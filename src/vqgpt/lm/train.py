"""Stage two: the Accelerate training loop of the GPT-2 over the joint text + image vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqgpt.config import ConfigError, load_config
from vqgpt.lm.batches import ExampleBank, build_epoch, joint_tokenizer
from vqgpt.lm.evaluate import LMEvalConfig, evaluate_lm
from vqgpt.lm.loss import lm_loss
from vqgpt.lm.model import LMConfig, build_lm, flops_per_token, forward_hidden, peak_flops
from vqgpt.lm.pipeline import save_pipeline
from vqgpt.lm.pretokenize import PretokenizeConfig, pretokenize
from vqgpt.lm.sequences import SequenceConfig
from vqgpt.training import (
    TrainConfig,
    build_optimizer,
    optimizer_step,
    resume_run,
    run_loop,
    start_run,
    warmup_cosine,
    write_summary,
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


def load_lm_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    patch: dict[str, Any] | None = None,
) -> LMRecipe:
    """Read an LM recipe YAML, `patch` (a partial recipe) merged over it, then dotted overrides."""
    return load_config(LMRecipe, path, overrides, patch)


def train_lm(recipe: LMRecipe, resume: str | None = None) -> Path:
    """Train (or resume) the stage-two GPT-2; returns the <run>/final folder."""
    tc = recipe.train
    accelerator = start_run(recipe, tc, "vqgpt-lm")
    out = Path(tc.output_dir)

    codes = pretokenize(recipe.data)  # no work when the codes are cached already
    if codes.did_work:
        accelerator.print(codes.summary())
    tokenizer = joint_tokenizer(recipe.data, base=recipe.text_tokenizer)
    bank = ExampleBank.load(recipe.data, recipe.data.images.train_split, tokenizer)
    layout, seq = bank.layout, recipe.sequences
    seq.check_fits(layout)
    eval_bank = None
    if accelerator.is_main_process and recipe.eval.max_images > 0:
        eval_bank = ExampleBank.load(recipe.data, recipe.data.images.eval_split, tokenizer)

    model = build_lm(recipe.model, layout.vocab_size, seq.max_length)
    model.config.t2i_prefix_length = seq.t2i_prefix_length  # decoding builds prompts from it
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    metrics, state = resume_run(accelerator, tc, resume)

    flops_token = flops_per_token(raw_model.config, seq.max_length)
    peak = peak_flops(accelerator.device)

    def evaluate(step: int) -> str | None:
        if eval_bank is None:
            return None
        result = evaluate_lm(raw_model, eval_bank, bank, seq, recipe.eval)
        metrics.log(step, result.to_log(), kind="eval")
        return result.summary()

    def epoch_batches(epoch: int, skip: int) -> list[dict[str, torch.Tensor]]:
        built = build_epoch(
            bank, seq, epoch, tc.batch_size, accelerator.process_index, accelerator.num_processes
        )
        if not built.batches:
            raise ConfigError(
                f"one epoch of {len(bank)} examples packs into fewer windows than one batch of "
                f"{tc.batch_size} x {accelerator.num_processes} processes: lower train.batch_size"
            )
        if epoch == 0 and skip == 0 and built.skipped:
            accelerator.print(f"sequences: {built.skipped} example(s) too long, skipped")
        return built.batches[skip:]

    def train_step(batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
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
        optimizer_step(accelerator, model, optimizer, scheduler, loss.loss, tc.grad_clip)
        return {
            "loss": float(loss.loss.detach()),
            "image_loss": float(loss.image_loss),
            "text_loss": float(loss.text_loss),
            "items": float(batch["attention_mask"].sum()),
        }

    def add_mfu(values: dict[str, float]) -> None:
        if peak:
            values["mfu"] = (
                values["tokens_per_s"] * flops_token / (peak * accelerator.num_processes)
            )

    state = run_loop(
        accelerator,
        tc,
        model,
        scheduler,
        metrics,
        state,
        epoch_batches,
        train_step,
        evaluate,
        desc="lm",
        items_name="tokens",
        on_log=add_mfu,
    )
    final = out / "final"
    if accelerator.is_main_process:
        save_pipeline(final, raw_model, bank.tokenizer, bank.image_tokenizer_dir)
    write_summary(accelerator, model, final, state)
    accelerator.end_training()
    return final


__all__ = ["LMRecipe", "load_lm_recipe", "train_lm"]
