"""Stage-two data: a split's cached image codes and caption ids, turned into per-epoch batches.

Nothing here holds a split in memory: the bank reads rows from the split's Arrow files
(`codes_files`) with plain file reads (`arrow_rows.ArrowRows`: a memory map would leave every page
it touched in the resident set) and tokenizes their captions when they are asked for, and an
epoch is built one optimizer step at a time as it is iterated. Resident memory is the shuffled
row order (4 bytes a row) plus one step's windows, whatever the corpus size
(`scripts/bench_lm_memory.py`).
"""

from __future__ import annotations

import array
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from vqgpt.lm.arrow_rows import ArrowRows, grid_codes, ragged_grid_codes
from vqgpt.lm.pretokenize import PretokenizeConfig, codes_files, codes_tensor
from vqgpt.lm.pretokenize_documents import documents_split_name, segments_of
from vqgpt.lm.sequences import (
    Example,
    FitStream,
    SequenceConfig,
    build_document,
    collate,
    make_example,
    noisy_context,
)
from vqgpt.lm.vocab import JointTokenizer, VocabLayout
from vqgpt.tokenizer.codec import resolve_model_dir
from vqgpt.tokenizer.vqvae import VQVAEConfig

if TYPE_CHECKING:
    import datasets

READ_ROWS = 256  # rows an epoch reads (and whose captions it tokenizes) at a time


class BankRows(NamedTuple):
    """Some rows of a bank, in the order asked for."""

    codes: torch.Tensor  # (n, h, w) long
    text_ids: list[list[int]]  # each caption's BPE ids


def _check_grid(
    rows: ArrowRows | datasets.Dataset,
    grid: tuple[int, ...],
    tokenizer: JointTokenizer,
    where_tokenizer: str,
    kind: str = "",
) -> None:
    """ValueError unless the stored codes' grid is the tokenizer's."""
    if grid != tuple(tokenizer.layout.grid):
        where = rows.files[0] if isinstance(rows, ArrowRows) else "the dataset"
        raise ValueError(
            f"{where}: cached {kind}codes have grid {grid}, the tokenizer {where_tokenizer}"
            f"makes {tuple(tokenizer.layout.grid)}: pretokenize again"
        )


class ExampleBank:
    """One split: image codes and captions read on demand, and the vocabulary that joins them.

    `rows` is the split's Arrow files (`ArrowRows(codes_files(...))`, what `load` opens: file
    reads, nothing memory-mapped) or any `datasets.Dataset` with the same columns (`codes` (h, w),
    `text`; tests build small ones in memory).

    Raises:
        ValueError: the codes' grid is not the tokenizer's.
    """

    def __init__(
        self,
        rows: ArrowRows | datasets.Dataset,
        tokenizer: JointTokenizer,
        image_tokenizer_dir: Path,
    ) -> None:
        _check_grid(
            rows, tuple(rows.features["codes"].shape), tokenizer, f"in {image_tokenizer_dir} "
        )
        if not isinstance(rows, ArrowRows):
            rows = rows.with_format("numpy", columns=["codes", "text"])
        self.rows = rows
        self.tokenizer = tokenizer
        self.image_tokenizer_dir = image_tokenizer_dir

    @property
    def layout(self) -> VocabLayout:
        return self.tokenizer.layout

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, rows: Sequence[int]) -> BankRows:
        """The codes and caption ids of `rows` (one gather; captions tokenized now)."""
        rows = [int(r) for r in rows]
        if not rows:
            return BankRows(torch.empty((0, *self.layout.grid), dtype=torch.long), [])
        if isinstance(self.rows, ArrowRows):
            columns = self.rows.take(rows, ["codes", "text"])
            codes = torch.from_numpy(grid_codes(columns["codes"], self.layout.grid)).long()
            texts = [str(t) for t in columns["text"].to_pylist()]
        else:
            batch = self.rows[rows]
            codes = codes_tensor(batch["codes"])
            texts = [str(t) for t in batch["text"].tolist()]
        return BankRows(codes, self.tokenizer.encode_texts(texts))

    @classmethod
    def load(cls, data: PretokenizeConfig, split: str, tokenizer: JointTokenizer) -> ExampleBank:
        """Open `split` of the pretokenized codes, checked against `tokenizer`'s layout."""
        model_dir, codebook_size, grid = _image_tokenizer(data)
        tokenizer.layout.check_compatible(codebook_size, grid)
        return cls(ArrowRows(codes_files(data.output_dir, split)), tokenizer, model_dir)


Segment = list[int] | torch.Tensor  # a document's text (BPE ids) or image (codes [h, w])


class DocumentBank:
    """One split of pretokenized documents, read on demand like `ExampleBank`: `rows` is the
    split's Arrow files (`ArrowRows`) or a `datasets.Dataset` with the same columns (`kinds`,
    `texts`, `codes`: `vqgpt.lm.pretokenize_documents`).

    Raises:
        ValueError: the codes' grid is not the tokenizer's.
    """

    def __init__(self, rows: ArrowRows | datasets.Dataset, tokenizer: JointTokenizer) -> None:
        _check_grid(rows, tuple(rows.features["codes"].shape[1:]), tokenizer, "", "document ")
        self.rows = rows
        self.tokenizer = tokenizer

    @property
    def layout(self) -> VocabLayout:
        return self.tokenizer.layout

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, rows: Sequence[int]) -> list[list[Segment]]:
        """The segments of each of `rows`, in order (texts tokenized now)."""
        rows = [int(r) for r in rows]
        names = ["kinds", "texts", "codes"]
        if isinstance(self.rows, ArrowRows):
            columns = self.rows.take(rows, names)
        else:
            table = self.rows.with_format("arrow")[rows]
            columns = {c: table.column(c).combine_chunks() for c in names}
        codes = ragged_grid_codes(columns["codes"], self.layout.grid)
        texts = columns["texts"].to_pylist()
        ids = iter(self.tokenizer.encode_texts([str(t) for doc in texts for t in doc]))
        return [
            segments_of(kinds, [next(ids) for _ in doc_texts], torch.from_numpy(grids).long())
            for kinds, doc_texts, grids in zip(
                columns["kinds"].to_pylist(), texts, codes, strict=True
            )
        ]

    @classmethod
    def load(cls, data: PretokenizeConfig, split: str, tokenizer: JointTokenizer) -> DocumentBank:
        """Open documents `split` of the pretokenized codes (<output_dir>/documents-<split>/)."""
        model_dir, codebook_size, grid = _image_tokenizer(data)
        tokenizer.layout.check_compatible(codebook_size, grid)
        return cls(ArrowRows(codes_files(data.output_dir, documents_split_name(split))), tokenizer)


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


def joint_tokenizer(
    data: PretokenizeConfig, base: str | None = None, documents: bool = False
) -> JointTokenizer:
    """The joint vocabulary for the codes of `data`: GPT-2's BPE (or `base`) + K image tokens
    (+ `<|doc|>` when the LM trains on `documents`)."""
    _, codebook_size, grid = _image_tokenizer(data)
    return JointTokenizer.build(codebook_size, grid, base=base, documents=documents)


def shuffled_rows(n: int, rng: random.Random) -> array.array:
    """range(n) in the order `rng.shuffle(list(range(n)))` leaves it, drawing the same numbers
    from `rng`, in a flat array (4 bytes a row) instead of a list of n int objects."""
    order = array.array("i" if n < 2**31 else "q", range(n))
    randbelow = rng._randbelow  # CPython's Random.shuffle: Fisher-Yates over _randbelow(i + 1)
    for i in reversed(range(1, n)):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class EpochBatches:
    """This rank's micro-batches of one epoch (`build_epoch`), built one optimizer step at a time
    as they are iterated. After a full iteration `steps` is the epoch's number of optimizer
    steps and `skipped` the examples left out as too long (both count as they go)."""

    def __init__(
        self,
        bank: ExampleBank,
        seq: SequenceConfig,
        epoch: int,
        batch_size: int,
        rank: int,
        world: int,
        accumulation: int,
        skip: int,
        documents: DocumentBank | None = None,
    ) -> None:
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split across {world} processes")
        if seq.document_ratio > 0 and not documents:
            raise ValueError(
                f"sequences.document_ratio={seq.document_ratio} needs documents (data.documents)"
            )
        self.documents = documents if seq.document_ratio > 0 else None
        self.bank, self.seq, self.epoch = bank, seq, epoch
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.accumulation, self.skip = accumulation, skip
        self.steps = 0
        self._fitted: FitStream | None = None

    @property
    def skipped(self) -> int:
        """Examples left out as too long so far."""
        return self._fitted.skipped if self._fitted is not None else 0

    def _examples(self, rng: random.Random) -> Iterator[Example]:
        """The epoch's examples in shuffled order: the shuffle, then each row's task, from `rng`.
        With documents, before each image example come documents while a draw of their own
        generator falls under `document_ratio` (a fraction `document_ratio` of all examples)."""
        order = shuffled_rows(len(self.bank), rng)
        documents = self._document_examples() if self.documents is not None else None
        mix = random.Random(f"vqgpt-lm-mix-{self.seq.seed}-{self.epoch}")
        for start in range(0, len(order), READ_ROWS):
            rows = self.bank.read(order[start : start + READ_ROWS])
            for codes, text_ids in zip(rows.codes, rows.text_ids, strict=True):
                while documents is not None and mix.random() < self.seq.document_ratio:
                    yield next(documents)
                yield make_example(codes, text_ids, self.bank.layout, self.seq, rng)

    def _document_examples(self) -> Iterator[Example]:
        """Document examples without end: the documents in a shuffled order, reshuffled at each
        pass, from their own generator (deterministic in seed and epoch)."""
        assert self.documents is not None
        rng = random.Random(f"vqgpt-lm-documents-{self.seq.seed}-{self.epoch}")
        layout = self.documents.layout
        while True:
            order = shuffled_rows(len(self.documents), rng)
            for start in range(0, len(order), READ_ROWS):
                for segments in self.documents.read(order[start : start + READ_ROWS]):
                    yield build_document(segments, layout, None, self.seq)

    def _noisy(self, window: Example, step: int, index: int) -> Example:
        """`noisy_context` of the step's `index`-th window, from a generator of its own (seed,
        epoch, step, index): every rank and every resume draws the same noise for it."""
        rng = random.Random(f"vqgpt-lm-noise-{self.seq.seed}-{self.epoch}-{step}-{index}")
        return noisy_context(window, self.bank.layout, self.seq.image_input_noise, rng)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(f"vqgpt-lm-{self.seq.seed}-{self.epoch}")
        self._fitted = FitStream(self._examples(rng), self.bank.layout, self.seq)
        self.steps = 0
        per_step = self.batch_size * self.accumulation
        b = self.batch_size // self.world
        step: list[Example] = []
        for window in self._fitted:
            step.append(window)
            if len(step) < per_step:
                continue
            first = self.steps * self.accumulation  # the step's first micro-batch in the epoch
            self.steps += 1
            if first + self.accumulation > self.skip:
                if self.seq.image_input_noise > 0:  # the same draws at any number of processes
                    step = [self._noisy(w, self.steps - 1, i) for i, w in enumerate(step)]
                if self.seq.group_by_length:  # stable: equal lengths keep their order
                    step.sort(key=len)
                weight = sum(sum(w.loss_weights[1:]) for w in step)  # the step's targets
                normalizer = torch.tensor(max(weight, 1e-12) / (self.world * self.accumulation))
                for m in range(max(self.skip - first, 0), self.accumulation):
                    start = m * self.batch_size + self.rank * b
                    batch = collate(step[start : start + b], pad_id=self.bank.layout.eos_id)
                    batch["normalizer"] = normalizer
                    yield batch
            step = []


def build_epoch(
    bank: ExampleBank,
    seq: SequenceConfig,
    epoch: int,
    batch_size: int,
    rank: int,
    world: int,
    accumulation: int = 1,
    skip: int = 0,
    documents: DocumentBank | None = None,
) -> EpochBatches:
    """Shuffle, pick tasks, pack and split one epoch; deterministic in (seq.seed, epoch). Lazy:
    the result builds its micro-batches as it is iterated (see `EpochBatches`).

    Every rank builds the same windows. Global micro-batch g holds windows [g*B, (g+1)*B) of
    `batch_size` B; rank r takes its rows [g*B + r*b, g*B + (r+1)*b), b = B / world: the union
    over ranks is the micro-batch one process trains on. An epoch keeps a whole number of
    optimizer steps (`accumulation` micro-batches each; the windows left over are dropped), so a
    step never spans two epochs. Each micro-batch carries "normalizer": the summed loss weight of
    its optimizer step's targets (every micro-batch of the step, every rank) / (world *
    accumulation): the weighted mean of the whole step is what every configuration trains on.
    A resumed run passes `skip`, the micro-batches already done: their examples are built again
    (the shuffle, task draws and packing depend on them) but not collated.

    Documents (`documents`, used when `seq.document_ratio` > 0) mix in from generators of their
    own, so with document_ratio 0 every epoch is the one without them, bit for bit.
    """
    return EpochBatches(bank, seq, epoch, batch_size, rank, world, accumulation, skip, documents)


__all__ = [
    "BankRows",
    "DocumentBank",
    "EpochBatches",
    "ExampleBank",
    "build_epoch",
    "joint_tokenizer",
    "shuffled_rows",
]
