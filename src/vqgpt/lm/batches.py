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
    """This rank's batches of one epoch, and how many examples were too long to keep."""

    batches: list[dict[str, torch.Tensor]]
    skipped: int


def build_epoch(
    bank: ExampleBank, seq: SequenceConfig, epoch: int, batch_size: int, rank: int, world: int
) -> EpochBatches:
    """Shuffle, pick tasks, pack and shard one epoch; deterministic in (seq.seed, epoch).

    Every rank builds the same windows and takes an equal contiguous share, so all ranks run the
    same number of steps; a resumed run rebuilds the epoch and skips the batches already done.
    """
    rng = random.Random(f"vqgpt-lm-{seq.seed}-{epoch}")
    order = list(range(len(bank)))
    rng.shuffle(order)
    examples = [make_example(bank.codes[i], bank.text_ids[i], bank.layout, seq, rng) for i in order]
    fitted = fit(examples, bank.layout, seq)
    per_rank = len(fitted.examples) // world
    mine = fitted.examples[rank * per_rank : (rank + 1) * per_rank]
    batches = [
        collate(mine[i : i + batch_size], pad_id=bank.layout.eos_id)
        for i in range(0, per_rank - batch_size + 1, batch_size)
    ]
    return EpochBatches(batches, fitted.skipped)
