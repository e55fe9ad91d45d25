"""Stage-two evaluation: held-out loss per task and token kind, against a unigram baseline."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from vqgpt.config import ConfigError
from vqgpt.lm.batches import DocumentBank, ExampleBank
from vqgpt.lm.loss import LOSS_MODES, lm_loss
from vqgpt.lm.model import forward_hidden
from vqgpt.lm.sequences import (
    IGNORE_INDEX,
    TASK_IDS,
    Example,
    SequenceConfig,
    build_caption,
    build_document,
    build_t2i,
    collate,
    truncate,
)
from vqgpt.lm.vocab import VocabLayout


@dataclass
class LMEvalConfig:
    """How much held-out data the LM's loss is measured on."""

    max_images: int = 200  # each held-out image gives one text-to-image and one captioning example
    batch_size: int = 32
    baseline_images: int = 2000  # train images the unigram baseline is counted on
    max_documents: int = 200  # held-out documents (with data.documents), one example each

    def __post_init__(self) -> None:
        if self.max_images < 0 or self.batch_size < 1 or self.baseline_images < 1:
            raise ConfigError("eval.max_images >= 0, eval.batch_size and baseline_images >= 1")
        if self.max_documents < 0:
            raise ConfigError("eval.max_documents must be >= 0")


@dataclass
class LMEvalResult:
    """Mean cross-entropy (nats per target token) per group, for the model and the baseline.

    Groups: "t2i", "caption", "t2i/image", "t2i/text", "caption/text", ... and, with documents,
    "document", "document/image", "document/text". `full` normalises over
    the whole vocabulary; `split` over the image rows for image targets and the text rows
    elsewhere (what constrained decoding samples from). The baseline is a per-task unigram model
    counted on training targets (add-one smoothing), normalised the same two ways.
    """

    full: dict[str, float]
    split: dict[str, float]
    unigram_full: dict[str, float]
    unigram_split: dict[str, float]

    def to_log(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ("full", "split", "unigram_full", "unigram_split"):
            out.update({f"{name}/{k}": v for k, v in getattr(self, name).items()})
        return out

    def summary(self) -> str:
        parts = [
            f"{task} {self.full.get(task, math.nan):.3f} (unigram {self.unigram_full.get(task, math.nan):.3f})"
            for task in ("t2i", "caption", "document")
            if task != "document" or task in self.full
        ]
        return "eval loss " + ", ".join(parts)


def eval_examples(bank: ExampleBank, seq: SequenceConfig, limit: int) -> list[Example]:
    """Both tasks for each of the first `limit` images (no caption dropout, no packing), cut to
    `seq.max_length` as training cuts them (`truncate`; one left with no target is left out)."""
    out = []
    rows = bank.read(range(min(limit, len(bank))))
    for codes, text_ids in zip(rows.codes, rows.text_ids, strict=True):
        for build in (build_t2i, build_caption):
            example = build(codes, text_ids, bank.layout, seq)
            example = truncate(example, seq.max_length, bank.layout)
            if example is not None:
                out.append(example)
    return out


def document_examples(
    documents: DocumentBank | None, seq: SequenceConfig, limit: int
) -> list[Example]:
    """The first `limit` documents, cut to `seq.max_length` as training cuts them."""
    if documents is None:
        return []
    out = []
    for segments in documents.read(range(min(limit, len(documents)))):
        example = truncate(
            build_document(segments, documents.layout, None, seq), seq.max_length, documents.layout
        )
        if example is not None:
            out.append(example)
    return out


def group_masks(
    labels: torch.Tensor, task_ids: torch.Tensor, layout: VocabLayout
) -> dict[str, torch.Tensor]:
    """Bool masks [B, T-1] over the shifted targets (position t predicts token t + 1) of labels and
    task ids [B, T]: per task ("t2i", "caption", "document") and per task and kind ("t2i/image",
    "t2i/text", ...; image = an image-code target, text = any other)."""
    targets, tasks = labels[:, 1:], task_ids[:, 1:]
    valid = targets != IGNORE_INDEX
    image = valid & (targets >= layout.image_offset)
    masks = {}
    for name in ("t2i", "caption", "document"):
        in_task = valid & (tasks == TASK_IDS[name])
        masks[name] = in_task
        masks[f"{name}/image"] = in_task & image
        masks[f"{name}/text"] = in_task & ~image
    return masks


def _mean(sums: Counter, counts: Counter) -> dict[str, float]:
    return {k: sums[k] / counts[k] for k in counts if counts[k]}


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    eval_bank: ExampleBank,
    train_bank: ExampleBank,
    seq: SequenceConfig,
    cfg: LMEvalConfig,
    eval_documents: DocumentBank | None = None,
    train_documents: DocumentBank | None = None,
) -> LMEvalResult:
    """Held-out CE per task and kind under both normalisations, plus the unigram baseline
    (documents too when `eval_documents` is given; their baseline counts `train_documents`)."""
    layout = eval_bank.layout
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = eval_examples(eval_bank, seq, cfg.max_images)
    examples += document_examples(eval_documents, seq, cfg.max_documents)
    sums = {m: Counter() for m in LOSS_MODES}
    counts: Counter = Counter()
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start : start + cfg.batch_size], pad_id=layout.eos_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
        masks = group_masks(batch["labels"], batch["task_ids"], layout)
        for m in LOSS_MODES:
            ce = lm_loss(
                hidden,
                model.lm_head.weight,
                batch["labels"],
                None,
                m,
                layout.image_offset,
                layout.codebook_size,
            ).per_position
            for key, mask in masks.items():
                sums[m][key] += float(ce[mask].sum())
        for key, mask in masks.items():
            counts[key] += int(mask.sum())
    model.train(was_training)
    train_docs = document_examples(train_documents, seq, cfg.baseline_images)
    baseline = unigram_baseline(train_bank, examples, seq, cfg.baseline_images, train_docs)
    return LMEvalResult(
        full=_mean(sums["full"], counts),
        split=_mean(sums["split"], counts),
        unigram_full=baseline["full"],
        unigram_split=baseline["split"],
    )


def unigram_baseline(
    train_bank: ExampleBank,
    eval_set: list[Example],
    seq: SequenceConfig,
    train_images: int,
    train_documents: list[Example] = (),
) -> dict[str, dict[str, float]]:
    """CE of per-task unigram models (counted on train targets) on the eval targets."""
    layout = train_bank.layout
    train = eval_examples(train_bank, seq, train_images) + list(train_documents)
    tables: dict[str, Counter] = {name: Counter() for name in ("t2i", "caption")}
    if train_documents or any(ex.task == "document" for ex in eval_set):
        tables["document"] = Counter()
    for ex in train:
        tables[ex.task].update(t for t in ex.labels[1:] if t != IGNORE_INDEX)
    text_rows, image_rows = layout.image_offset, layout.codebook_size
    out: dict[str, dict[str, float]] = {"full": {}, "split": {}}
    sums = {m: Counter() for m in LOSS_MODES}
    counts: Counter = Counter()
    totals = {}
    for task, table in tables.items():
        text_total = sum(v for t, v in table.items() if t < layout.image_offset)
        totals[task] = (sum(table.values()), text_total, sum(table.values()) - text_total)
    for ex in eval_set:
        table = tables[ex.task]
        all_total, text_total, image_total = totals[ex.task]
        for t in ex.labels[1:]:
            if t == IGNORE_INDEX:
                continue
            is_image = t >= layout.image_offset
            kind = "image" if is_image else "text"
            p_full = (table[t] + 1) / (all_total + layout.vocab_size)
            p_split = (
                (table[t] + 1) / (image_total + image_rows)
                if is_image
                else (table[t] + 1) / (text_total + text_rows)
            )
            for key in (ex.task, f"{ex.task}/{kind}"):
                sums["full"][key] -= math.log(p_full)
                sums["split"][key] -= math.log(p_split)
                counts[key] += 1
    for m in LOSS_MODES:
        out[m] = _mean(sums[m], counts)
    return out
