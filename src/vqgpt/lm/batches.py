"""Stage-two data: a split's cached image codes and caption ids, turned into per-epoch batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vqgpt.lm.pretokenize import PretokenizeConfig, codes_tensor, load_codes
from vqgpt.lm.sequences import SequenceConfig, collate, fit, make_example
from vqgpt.lm.vocab import JointTokenizer, VocabLayout
from vqgpt.tokenizer.codec import resolve_model_dir
from vqgpt.tokenizer.vqvae import VQVAEConfig


@dataclass
class ExampleBank:
    """One split: codes [N, h, w], caption token ids, and the vocabulary that joins them."""

    codes: torch.Tensor  # (N, h, w)
    text_ids: list[list[int]]
    texts: list[str]
    tokenizer: JointTokenizer
    image_tokenizer_dir: Path

    @property
    def layout(self) -> VocabLayout:
        return self.tokenizer.layout

    def __len__(self) -> int:
        return len(self.text_ids)

    @classmethod
    def load(cls, data: PretokenizeConfig, split: str, tokenizer: JointTokenizer) -> ExampleBank:
        """Read `split` of the pretokenized codes, checked against `tokenizer`'s layout."""
        model_dir, codebook_size, grid = _image_tokenizer(data)
        tokenizer.layout.check_compatible(codebook_size, grid)
        ds = load_codes(data.output_dir, split)
        texts = list(ds["text"])
        codes = codes_tensor(ds["codes"]).long()
        if tuple(codes.shape[1:]) != tuple(grid):
            raise ValueError(
                f"{data.output_dir}/{split}: cached codes have grid {tuple(codes.shape[1:])}, the "
                f"tokenizer in {model_dir} makes {tuple(grid)}: pretokenize again"
            )
        return cls(codes, tokenizer.encode_texts(texts), texts, tokenizer, model_dir)


def _image_tokenizer(data: PretokenizeConfig) -> tuple[Path, int, tuple[int, int]]:
    """(folder, codebook size, grid) of the stage-one tokenizer the codes were made with."""
    model_dir = resolve_model_dir(data.tokenizer)
    vq = VQVAEConfig.from_pretrained(model_dir)
    if vq.quant.num_quantizers > 1:
        raise ValueError(
            f"{model_dir}: stage two takes one code per position; this tokenizer has "
            f"num_quantizers={vq.quant.num_quantizers} (residual)"
        )
    return model_dir, vq.codebook_size, vq.grid


def joint_tokenizer(data: PretokenizeConfig, base: str | None = None) -> JointTokenizer:
    """The joint vocabulary for the codes of `data`: GPT-2's BPE (or `base`) + K image tokens."""
    _, codebook_size, grid = _image_tokenizer(data)
    return JointTokenizer.build(codebook_size, grid, base=base)


@dataclass
class EpochBatches:
    """This rank's micro-batches of one epoch, and how many examples were too long to keep."""

    batches: list[dict[str, torch.Tensor]]
    skipped: int


def build_epoch(
    bank: ExampleBank,
    seq: SequenceConfig,
    epoch: int,
    batch_size: int,
    rank: int,
    world: int,
    accumulation: int = 1,
) -> EpochBatches:
    """Shuffle, pick tasks, pack and split one epoch; deterministic in (seq.seed, epoch).

    Every rank builds the same windows. Global micro-batch g holds windows [g*B, (g+1)*B) of
    `batch_size` B; rank r takes its rows [g*B + r*b, g*B + (r+1)*b), b = B / world: the union
    over ranks is the micro-batch one process trains on. An epoch keeps a whole number of
    optimizer steps (`accumulation` micro-batches each; the windows left over are dropped), so a
    step never spans two epochs. Each micro-batch carries "normalizer": the summed loss weight of
    its optimizer step's targets (every micro-batch of the step, every rank) / (world *
    accumulation): the weighted mean of the whole step is what every configuration trains on.
    A resumed run rebuilds the epoch and skips the micro-batches already done.
    """
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not split across {world} processes")
    rng = random.Random(f"vqgpt-lm-{seq.seed}-{epoch}")
    order = list(range(len(bank)))
    rng.shuffle(order)
    examples = [make_example(bank.codes[i], bank.text_ids[i], bank.layout, seq, rng) for i in order]
    fitted = fit(examples, bank.layout, seq)
    windows = fitted.examples
    per_step = batch_size * accumulation
    steps = len(windows) // per_step
    b = batch_size // world
    batches = []
    for s in range(steps):
        step_windows = windows[s * per_step : (s + 1) * per_step]
        weight = sum(sum(w.loss_weights[1:]) for w in step_windows)  # the step's targets
        normalizer = torch.tensor(max(weight, 1e-12) / (world * accumulation))
        for m in range(accumulation):
            start = s * per_step + m * batch_size + rank * b
            batch = collate(windows[start : start + b], pad_id=bank.layout.eos_id)
            batch["normalizer"] = normalizer
            batches.append(batch)
    return EpochBatches(batches, fitted.skipped)
