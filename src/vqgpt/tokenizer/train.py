"""Stage one: the Accelerate training loop of the VQ-VAE image tokenizer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import skip_first_batches
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vqgpt.config import ConfigError, load_config
from vqgpt.data.sources import (
    DataConfig,
    DataError,
    StreamingImageTextDataset,
    collate_pixels,
    image_text_dataset,
)
from vqgpt.tokenizer.evaluate import EvalConfig, evaluate_tokenizer
from vqgpt.tokenizer.losses import LossConfig, VQLoss
from vqgpt.tokenizer.metrics import code_histogram, stats_from_histogram
from vqgpt.tokenizer.quantize import QuantizerConfig
from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig
from vqgpt.training import (
    Metric,
    TrainConfig,
    build_optimizer,
    finish_run,
    local_batch_size,
    optimizer_step,
    resume_run,
    resumed_iterator,
    run_loop,
    save_final,
    start_run,
    warmup_cosine,
    write_summary,
)


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
        self.quantizer.check_code_dim(self.model.latent_dim)  # fsq / lfq: the code dim fits
        if self.train.optimizer != "adamw":  # before a run folder is made
            raise ConfigError(
                f"train.optimizer={self.train.optimizer} is for the LM's hidden matrices; the "
                "tokenizer trains with train.optimizer=adamw"
            )


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    patch: dict[str, Any] | None = None,
    patch_source: str | None = None,
) -> TokenizerRecipe:
    """Read a tokenizer recipe YAML, `patch` (a partial recipe) merged over it, then dotted
    overrides. `patch_source` names where `patch` came from (for errors)."""
    return load_config(TokenizerRecipe, path, overrides, patch, patch_source)


def whole_batches(batches, batch_size: int):
    """A streamed epoch's batches; DataError when it gives none (a stream of fewer usable images
    than one batch would otherwise loop over empty epochs forever)."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise DataError(
            f"the streamed train split gave fewer usable images than one batch "
            f"(train.batch_size={batch_size})"
        )


def train_tokenizer(recipe: TokenizerRecipe, resume: str | None = None) -> Path:
    """Train (or resume) a VQ-VAE; returns the <run>/final folder."""
    tc = recipe.train
    accelerator = start_run(recipe, tc, "vqgpt-tokenizer", resume)
    out = Path(tc.output_dir)

    local_batch_size(tc, accelerator)  # the global batch must split evenly
    train_set = image_text_dataset(recipe.data, recipe.data.train_split, train=True, seed=tc.seed)
    if train_set.stats.total:
        accelerator.print(f"train data: {train_set.stats}", file=sys.stderr)
    streamed = isinstance(train_set, StreamingImageTextDataset)  # no len(): checked per epoch
    if not streamed and len(train_set) < tc.batch_size:
        raise ValueError(
            f"train split has {len(train_set)} usable images, fewer than one batch "
            f"(train.batch_size={tc.batch_size})"
        )
    # the global batch (Accelerate splits it across processes), in the seedable sampler's order;
    # a stream is shuffled by datasets, and under N processes rank 0 reads it and sends each rank
    # its slice of the global batch (Accelerate's dispatch_batches for iterable datasets)
    loader = DataLoader(
        train_set,
        batch_size=tc.batch_size,
        shuffle=not streamed,
        drop_last=True,
        collate_fn=collate_pixels,
        num_workers=recipe.data.num_workers,
    )

    model = VQVAE(VQVAEConfig.build(recipe.model, recipe.quantizer))
    loss_fn = VQLoss(recipe.loss)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    disc_optimizer = None
    if loss_fn.discriminator is not None:
        # taming's GAN betas; the same decay rule as the autoencoder (it was AdamW's implicit
        # 0.01 on every parameter before)
        disc_optimizer = build_optimizer(loss_fn.discriminator, tc, betas=(0.5, 0.9))
        loss_fn.discriminator, disc_optimizer = accelerator.prepare(
            loss_fn.discriminator, disc_optimizer
        )
    loss_fn.to(accelerator.device)
    raw_model: VQVAE = accelerator.unwrap_model(model)

    metrics, state = resume_run(accelerator, tc, resume)

    eval_set = None
    if accelerator.is_main_process and recipe.eval.max_images > 0:
        eval_set = image_text_dataset(
            recipe.data, recipe.data.eval_split, train=False, max_rows=recipe.eval.max_images
        )

    def evaluate(step: int) -> str | None:
        if eval_set is None or not len(eval_set):
            return None
        grid = out / "samples" / f"recon_{step:06d}.png"
        result = evaluate_tokenizer(raw_model, eval_set, recipe.eval, grid_path=grid)
        metrics.log(step, result.to_log(), kind="eval")
        return result.summary()

    def epoch_batches(epoch: int, skip: int):
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)  # random crops are drawn per (seed, epoch, row)
        batches = resumed_iterator(skip_first_batches(loader, skip)) if skip else loader
        if not streamed:
            return batches
        return streamed_epoch(batches if skip else whole_batches(batches, tc.batch_size), epoch)

    reported: list[int] = []  # epochs whose skipped rows were printed (the first one only)

    def streamed_epoch(batches, epoch: int):
        """A streamed epoch, then (the first time) what it skipped: counted as the rows passed,
        in this process (the reader under several processes; DataLoader workers count their
        own, which are not printed)."""
        train_set.stats = type(train_set.stats)()
        yield from batches
        stats = train_set.stats
        if not reported and (stats.total or stats.no_caption):
            if accelerator.is_main_process:  # on a line of its own, above the progress bar
                tqdm.write(f"train data, epoch {epoch}: {stats}", file=sys.stderr)
            reported.append(epoch)

    # codes seen since the last log (the perplexity logged is that of all of them, every rank's)
    histogram = torch.zeros(raw_model.codebook_size, dtype=torch.float64)
    # the quantizer's parameters a bypass step leaves out (its projections are in: they train)
    bypass_unused = raw_model.unused_in_bypass()
    qc = recipe.quantizer
    logs_entropy = qc.type == "lfq" or (qc.type == "vq" and qc.diversity_weight > 0)

    def train_step(batch: dict, step: int) -> dict[str, Metric]:
        pixels = batch["pixel_values"]
        bypass = step < recipe.quantizer.bypass_steps
        diversity_on = qc.type == "vq" and qc.diversity_weight > 0
        if diversity_on:  # quantizer.diversity_decay_steps: the weight falls to 0
            raw_model.quantizer.diversity_weight = qc.diversity_weight_at(step)
            diversity_on = raw_model.quantizer.diversity_weight > 0
        output = model(pixels, bypass_quantizer=bypass)
        record = loss_fn.autoencoder_loss(
            pixels, output.reconstruction, output.quantizer.loss, step, raw_model.last_layer
        )
        # bypassed, the quantizer's parameters outside its path get zero gradients only (so
        # that every process reduces every parameter); dropped before the update, as if they
        # had none. (Until 2026-12-01 the projections' gradients were dropped too: the bypass
        # meant to train them, and they stayed at their random init through it.)
        unused = bypass_unused if bypass else ()
        optimizer_step(accelerator, model, optimizer, scheduler, record.total, tc.grad_clip, unused)
        if disc_optimizer is not None and loss_fn.uses_discriminator(step):
            disc_record = loss_fn.discriminator_loss(pixels, output.reconstruction.detach(), step)
            disc_optimizer.zero_grad(set_to_none=True)  # drop the generator step's grads
            accelerator.backward(disc_record.total)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
            record.parts.update(disc_record.parts)
        n = float(len(pixels))
        values: dict[str, Metric] = {k: (v * n, n) for k, v in record.to_log().items()}
        # lfq's entropy penalty, vq's diversity loss (unweighted; while its weight is not 0)
        if logs_entropy and not bypass and (qc.type == "lfq" or diversity_on):
            values["entropy"] = (float(output.quantizer.entropy_loss.detach()) * n, n)
        first = output.codes if output.codes.ndim < 4 else output.codes[..., 0]  # (B, h, w)
        histogram.add_(code_histogram(first, raw_model.codebook_size))
        values["items"] = n
        return values

    def add_perplexity(logged: dict[str, float]) -> None:
        counts = accelerator.reduce(histogram.to(accelerator.device), reduction="sum").cpu()
        logged["perplexity"] = stats_from_histogram(counts).perplexity
        histogram.zero_()

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
        desc="tokenizer",
        items_name="images",
        on_log=add_perplexity,
    )
    final = save_final(accelerator, model, out)
    write_summary(accelerator, model, final, state)
    finish_run(accelerator)
    return final
