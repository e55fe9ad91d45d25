"""Stage two: the Accelerate training loop of the GPT-2 over the joint text + image vocabulary."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import GPT2LMHeadModel

from vqgpt.config import ConfigError, load_config
from vqgpt.files import read_json, write_text
from vqgpt.lm.batches import DocumentBank, ExampleBank, build_epoch, joint_tokenizer
from vqgpt.lm.evaluate import LMEvalConfig, evaluate_lm
from vqgpt.lm.loss import LMWithLoss
from vqgpt.lm.model import (
    LMConfig,
    build_lm,
    flops_per_token,
    hidden_matrices,
    init_image_embeddings,
    peak_flops,
)
from vqgpt.lm.pipeline import save_pipeline
from vqgpt.lm.pretokenize import PretokenizeConfig, pretokenize, tokenizer_fingerprint
from vqgpt.lm.sequences import SequenceConfig
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.training import (
    Metric,
    TrainConfig,
    build_optimizer,
    finish_run,
    full_state_dict,
    is_sharded,
    local_batch_size,
    optimizer_step,
    resolve_resume,
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

    def __post_init__(self) -> None:
        if self.sequences.document_ratio > 0 and self.data.documents is None:
            raise ConfigError(
                f"sequences.document_ratio={self.sequences.document_ratio} needs documents to "
                "draw from: set data.documents.source (a .jsonl file or shapes_stories)"
            )


def load_lm_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    patch: dict[str, Any] | None = None,
    patch_source: str | None = None,
) -> LMRecipe:
    """Read an LM recipe YAML, `patch` (a partial recipe) merged over it, then dotted overrides.
    `patch_source` names where `patch` came from (for errors)."""
    return load_config(LMRecipe, path, overrides, patch, patch_source)


def gather_lm(accelerator: Accelerator, model: torch.nn.Module) -> GPT2LMHeadModel | None:
    """The trained GPT-2 as a plain (unsharded, unwrapped) model on the main process, None on
    the others. A collective under FSDP: every rank calls it; the shards are gathered into a new
    model on the CPU (`training.full_state_dict`). Without FSDP the main process's own module is
    returned, no copy."""
    wrapped: LMWithLoss = accelerator.unwrap_model(model)
    if not is_sharded(model):
        return wrapped.lm if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    lm = GPT2LMHeadModel(wrapped.lm.config)
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    return lm.eval()


IMAGE_TOKENIZER_RECORD = "image_tokenizer.json"  # <run>/: the tokenizer whose codes it trains on


def check_image_tokenizer(
    accelerator: Accelerator, tc: TrainConfig, data: PretokenizeConfig, resume: str | None
) -> None:
    """A resumed run must go on with the image tokenizer it started with; a new run records it.

    The record is `<run>/image_tokenizer.json` (the path given and the sha256 fingerprint of the
    tokenizer's config and weights, as pretokenisation's). A tokenizer trained again in the same
    folder would otherwise have its codes encoded anew and the LM resumed on them, half its steps
    on one codebook and half on another.

    Raises:
        ConfigError: resuming, and `data.tokenizer` is not the tokenizer of the run's record.
    """
    record = Path(tc.output_dir) / IMAGE_TOKENIZER_RECORD
    now = tokenizer_fingerprint(data.tokenizer)
    if resolve_resume(tc.output_dir, resume) is not None and record.is_file():
        before = read_json(record)
        if before.get("fingerprint") != now:
            raise ConfigError(
                f"--resume: {tc.output_dir} was trained on the codes of another image tokenizer "
                f"than {data.tokenizer} holds now (sha256 {str(before.get('fingerprint'))[:12]} "
                f"then, {now[:12]} now; it started with {before.get('tokenizer')}); resume with "
                "the tokenizer it started with, or start a new run in another train.output_dir"
            )
        return
    if accelerator.is_main_process:
        text = json.dumps({"tokenizer": str(data.tokenizer), "fingerprint": now}, indent=2)
        write_text(record, text + "\n")


def train_lm(recipe: LMRecipe, resume: str | None = None) -> Path:
    """Train (or resume) the stage-two GPT-2; returns the <run>/final folder."""
    tc = recipe.train
    accelerator = start_run(recipe, tc, "vqgpt-lm", resume)
    out = Path(tc.output_dir)
    local_batch_size(tc, accelerator)  # the global batch must split evenly
    check_image_tokenizer(accelerator, tc, recipe.data, resume)  # before codes are re-encoded

    codes = pretokenize(recipe.data)  # no work when the codes are cached already
    if codes.did_work:
        accelerator.print(codes.summary(), file=sys.stderr)
    documents = recipe.sequences.document_ratio > 0  # then the vocabulary has <|doc|>
    tokenizer = joint_tokenizer(recipe.data, base=recipe.text_tokenizer, documents=documents)
    bank = ExampleBank.load(recipe.data, recipe.data.images.train_split, tokenizer)
    layout, seq = bank.layout, recipe.sequences
    seq.check_fits(layout)
    eval_bank = None
    if accelerator.is_main_process and recipe.eval.max_images > 0:
        eval_bank = ExampleBank.load(recipe.data, recipe.data.images.eval_split, tokenizer)
    documents = recipe.data.documents
    doc_bank = eval_docs = None
    if documents is not None:
        doc_bank = DocumentBank.load(recipe.data, documents.train_split, tokenizer)
        if eval_bank is not None and recipe.eval.max_documents > 0:
            eval_docs = DocumentBank.load(recipe.data, documents.eval_split, tokenizer)

    lm = build_lm(recipe.model, layout.vocab_size, seq.max_length)
    if recipe.model.image_embedding_init == "codebook":  # before a resume overwrites them
        vectors = load_tokenizer_model(bank.image_tokenizer_dir).code_vectors()
        if vectors.shape[0] != layout.codebook_size:
            raise ConfigError(
                f"model.image_embedding_init=codebook: the tokenizer in {bank.image_tokenizer_dir} "
                f"has {vectors.shape[0]} codes, the codes' vocabulary {layout.codebook_size}"
            )
        init_image_embeddings(lm, vectors, layout.image_offset, seed=tc.seed)
    lm.config.t2i_prefix_length = seq.t2i_prefix_length  # decoding builds prompts from it
    positions = seq.positions(layout)
    if positions is not None:  # every forward of the model reads it (lm.positions)
        lm.config.image_positions = positions.to_dict()
    # the loss runs inside the wrapped module's forward (data parallel and FSDP see it there)
    model = LMWithLoss(lm, recipe.model.loss, layout.image_offset, layout.codebook_size)
    optimizer = build_optimizer(model, tc, matrices=hidden_matrices(lm))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model).lm

    metrics, state = resume_run(accelerator, tc, resume)

    flops_token = flops_per_token(raw_model.config, seq.max_length)
    peak = peak_flops(accelerator.device)

    def evaluate(step: int) -> str | None:
        if recipe.eval.max_images <= 0:
            return None
        plain = gather_lm(accelerator, model)  # every rank: a collective under FSDP
        if eval_bank is None or plain is None:
            return None
        result = evaluate_lm(
            plain.to(accelerator.device), eval_bank, bank, seq, recipe.eval, eval_docs, doc_bank
        )
        metrics.log(step, result.to_log(), kind="eval")
        return result.summary()

    def epoch_batches(epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        built = build_epoch(
            bank,
            seq,
            epoch,
            tc.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            tc.gradient_accumulation_steps,
            skip,
            doc_bank,
        )
        yield from built  # built one optimizer step at a time
        if not built.steps:
            raise ConfigError(
                f"one epoch of {len(bank)} examples packs into fewer windows than one optimizer "
                f"step of train.batch_size={tc.batch_size} x gradient_accumulation_steps="
                f"{tc.gradient_accumulation_steps}: lower them"
            )
        if epoch == 0 and built.skipped:
            accelerator.print(
                f"sequences: {built.skipped} example(s) of epoch 0 too long, skipped",
                file=sys.stderr,
            )

    def train_step(batch: dict[str, torch.Tensor], step: int) -> dict[str, Metric]:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = model(  # the step's weighted mean, whatever the processes and accumulation
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["loss_weights"],
            batch["normalizer"],
        )
        optimizer_step(accelerator, model, optimizer, scheduler, loss.loss, tc.grad_clip)
        return {
            "loss": (float(loss.weighted_sum), float(loss.weight_sum)),
            "image_loss": (float(loss.image_sum), float(loss.image_count)),
            "text_loss": (float(loss.text_sum), float(loss.text_count)),
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
    plain = gather_lm(accelerator, model)  # every rank: a collective under FSDP
    if plain is not None:
        save_pipeline(final, plain, bank.tokenizer, bank.image_tokenizer_dir)
    write_summary(accelerator, model, final, state)
    finish_run(accelerator)
    return final


__all__ = ["LMRecipe", "load_lm_recipe", "train_lm"]
