"""Training sequences over the joint vocabulary: layouts, label masks, truncation, packing.

Sequences (docs/design.md "Sequences"; codes flattened row-major; `eos` = `<|endoftext|>`):

    t2i       eos caption boi codes eoi eos    targets: boi, codes, eoi, final eos
              (with `t2i_prefix_length` P: eos ... eos caption boi, the caption left-padded with
              eos to P tokens, so boi is always token P and every image code a fixed position)
    t2i, caption dropped (CFG's unconditional branch):
              eos boi codes eoi eos            targets: boi, codes, eoi, final eos
    caption   eos boi codes eoi caption eos    targets: caption, final eos
    document  eos doc seg_1 ... seg_n eos      targets: every token after `eos doc`
              (doc: `<|doc|>`, in layouts that have it (LMs trained on documents); it keeps a
              document that opens with an image apart from a captioning prompt)
              (text segment: its BPE ids; image segment: boi codes eoi)

Length rule (`token_budget`, the one place every path that builds or decodes a sequence asks):
an image with a caption of L text tokens takes L + h*w + 4 tokens in both formats (eos, boi, eoi and
the closing eos), so the longest caption a model with n_positions N takes is N - h*w - 4 (with
`t2i_prefix_length` P, a text-to-image prompt also at most P - 1). Decoding refuses prompts over it
(`SequenceLengthError`) and caps a caption's new tokens at it, so whatever it produces can be
re-scored (self-reranking) in either format without running past the position table.

The leading eos is never a target; conditioning (t2i's caption, captioning's image) is masked.
Labels follow the Hugging Face convention: `labels[i] == input_ids[i]` where token i is a target,
-100 elsewhere; the loss shifts (logits at i predict labels at i + 1). Loss weight of a target:
`image_loss_weight * task_weight` for image codes, `text_loss_weight * task_weight` for text and
special tokens (boi, eoi, eos); 0 where masked. Documents have task weight 1.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from einops import rearrange
from torch import Tensor

from vqgpt.config import ConfigError
from vqgpt.errors import VqgptError
from vqgpt.export.hub.processing_vqgpt import t2i_prefix as hub_t2i_prefix
from vqgpt.lm.positions import IMAGE_POSITIONS, ImagePositions
from vqgpt.lm.vocab import VocabLayout

IGNORE_INDEX = -100  # label of a masked position (torch / Hugging Face ignore_index)
TASKS = ("t2i", "caption", "document")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}  # per-position task ids; padding is -1
PAD_TASK = -1


IMAGE_CAPTION_FRAME = 4  # eos boi .. eoi .. eos: the tokens an image + caption sequence adds


class SequenceLengthError(VqgptError, ValueError):
    """A sequence that does not fit the model's position table (n_positions)."""


class TokenBudget(NamedTuple):
    """How many caption tokens fit a model's position table (`token_budget`)."""

    n_positions: int
    image_tokens: int  # h*w
    caption: int  # longest caption (text tokens) with one image, in either format
    t2i_caption: int  # longest caption of a text-to-image prompt (caption, and P - 1 with a prefix)


def token_budget(
    n_positions: int, layout: VocabLayout, t2i_prefix_length: int | None = None
) -> TokenBudget:
    """The length rule: captions of at most n_positions - h*w - 4 tokens (see the module
    docstring). A model whose table cannot hold one image: SequenceLengthError."""
    caption = n_positions - layout.tokens_per_image - IMAGE_CAPTION_FRAME
    if caption < 0:
        raise SequenceLengthError(
            f"the model's n_positions={n_positions} cannot hold one image: a {layout.grid} grid "
            f"takes {layout.tokens_per_image} codes + {IMAGE_CAPTION_FRAME} framing tokens"
        )
    t2i = caption if t2i_prefix_length is None else min(caption, t2i_prefix_length - 1)
    return TokenBudget(n_positions, layout.tokens_per_image, caption, t2i)


def check_length(length: int, n_positions: int, what: str) -> None:
    """Raise SequenceLengthError unless a sequence of `length` tokens fits `n_positions`."""
    if length > n_positions:
        raise SequenceLengthError(
            f"{what} has {length} tokens, more than the model's n_positions={n_positions}; "
            "shorten it"
        )


@dataclass
class SequenceConfig:
    """How examples are built, weighted and packed."""

    max_length: int = 128  # context window (tokens)
    t2i_ratio: float = 0.5  # fraction of image examples that are text-to-image; the rest captioning
    # fraction of training examples drawn from data.documents (the rest are image examples);
    # 0: no documents, every epoch exactly as without them
    document_ratio: float = 0.0
    text_loss_weight: float = 1.0  # weight of text / special targets
    image_loss_weight: float = 1.0  # weight of image-code targets
    t2i_weight: float = 1.0  # task weight of text-to-image examples
    caption_weight: float = 1.0  # task weight of captioning examples
    caption_dropout: float = 0.1  # fraction of t2i examples trained without caption (for CFG)
    pack: bool = True  # fill each window with several whole examples (else one per row)
    # t2i: left-pad `eos caption` with eos to this many tokens (None: no padding). With pack off,
    # each image code then sits at the same absolute position in every t2i example: the model
    # need not count from boi to know which grid cell it draws. Longer captions lose their tail.
    t2i_prefix_length: int | None = None
    # unpacked rows: within each optimizer step, sort its rows by length before they are split
    # into micro-batches (train.gradient_accumulation_steps) and processes, so short rows pad to
    # short rows (transformers' Trainer `group_by_length`). Same rows and targets per step, same
    # weighted-mean loss: only the padding, and so the compute, changes.
    group_by_length: bool = False
    # position ids of image codes (vqgpt.lm.positions): "sequential" (GPT-2's: each token at its
    # index) or "shared" (code k of every image at the position of a t2i example's code k, wherever
    # the image sits: documents' and captions' images train the positions t2i draws at)
    image_positions: str = "sequential"
    # noisy context (exposure bias): each training row that draws an image (t2i, documents) gets a
    # ratio r ~ U(0, image_input_noise), and each of its image-code *inputs* that is also a
    # target is replaced by a uniformly drawn code with probability r; the targets stay the true
    # codes, so the LM learns to draw the right next code after wrong ones. Captioning rows and
    # held-out losses see clean codes. 0 = off. The "switch" perturbation of reAR (He et al.,
    # "Rethinking Visual Autoregressive Models via Generator-Tokenizer Consistency
    # Regularization", 2025; perturb_input_tokens in github.com/QY-H00/reAR), kept constant here
    image_input_noise: float = 0.0
    seed: int = 0  # task choice, caption dropout and input noise

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ConfigError(f"sequences.max_length must be at least 4, got {self.max_length}")
        for name in ("t2i_ratio", "caption_dropout", "image_input_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"sequences.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.document_ratio < 1.0:
            raise ConfigError(
                f"sequences.document_ratio must be in [0, 1), got {self.document_ratio}: an epoch "
                "is one pass over the images, with documents mixed in at this rate"
            )
        if self.t2i_prefix_length is not None and self.t2i_prefix_length < 2:
            raise ConfigError(
                "sequences.t2i_prefix_length must be null or at least 2 (eos + one caption token), "
                f"got {self.t2i_prefix_length}"
            )
        if self.image_positions not in IMAGE_POSITIONS:
            raise ConfigError(
                f"sequences.image_positions must be one of {list(IMAGE_POSITIONS)}, "
                f"got {self.image_positions!r}"
            )
        for name in ("text_loss_weight", "image_loss_weight", "t2i_weight", "caption_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sequences.{name} must be >= 0, got {getattr(self, name)}")

    def positions(self, layout: VocabLayout) -> ImagePositions | None:
        """The shared image positions (None: sequential): codes from t2i_prefix_length + 1 (where
        a t2i example's first code sits), or from 2 without a prefix (a captioning example's)."""
        if self.image_positions == "sequential":
            return None
        offset = 2 if self.t2i_prefix_length is None else self.t2i_prefix_length + 1
        return ImagePositions(offset, layout.boi_id, layout.image_offset, layout.vocab_size)

    def check_fits(self, layout: VocabLayout) -> None:
        """Raise unless one image example (eos boi codes eoi eos) fits in `max_length`."""
        need = layout.tokens_per_image + 4
        if self.max_length < need:
            raise ConfigError(
                f"sequences.max_length={self.max_length} cannot hold one image: a {layout.grid} "
                f"grid needs {layout.tokens_per_image} codes + 4 framing tokens = {need}; "
                f"raise max_length (and the model's n_positions) to at least {need}"
            )
        prefix = self.t2i_prefix_length
        if prefix is not None and self.max_length < prefix + layout.tokens_per_image + 3:
            raise ConfigError(
                f"sequences.max_length={self.max_length} cannot hold a t2i example: "
                f"t2i_prefix_length={prefix} + boi + {layout.tokens_per_image} codes + eoi + eos "
                f"= {prefix + layout.tokens_per_image + 3} tokens; raise max_length or lower "
                "t2i_prefix_length"
            )


@dataclass
class Example:
    """One training sequence: ids, HF-style labels, per-position loss weights and task."""

    input_ids: list[int]
    labels: list[int]  # input_ids at targets, -100 where masked
    loss_weights: list[float]  # 0 where masked
    task: str  # "t2i" | "caption" | "document" | "mixed" (a packed window of several tasks)
    task_ids: list[int] = field(default_factory=list)  # per position; filled from `task`

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if self.task not in (*TASKS, "mixed"):
            raise ValueError(f"Example.task must be one of {TASKS} or 'mixed', got {self.task!r}")
        if not self.task_ids and self.task in TASK_IDS:
            self.task_ids = [TASK_IDS[self.task]] * n
        if not len(self.labels) == len(self.loss_weights) == len(self.task_ids) == n:
            raise ValueError(
                f"Example fields differ in length: input_ids {n}, labels {len(self.labels)}, "
                f"loss_weights {len(self.loss_weights)}, task_ids {len(self.task_ids)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, span: slice) -> Example:
        return Example(
            self.input_ids[span],
            self.labels[span],
            self.loss_weights[span],
            self.task,
            self.task_ids[span],
        )

    @property
    def num_targets(self) -> int:
        """Positions that carry a label."""
        return sum(label != IGNORE_INDEX for label in self.labels)


class TextEncoder(Protocol):
    """Anything with `encode_text` (a `JointTokenizer`)."""

    def encode_text(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------------------------------------
# building


class _Builder:
    """Appends runs of tokens, each a target (with a weight) or masked."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.weights: list[float] = []

    def add(self, ids: Sequence[int], target: bool, weight: float = 0.0) -> None:
        self.ids += ids
        self.labels += ids if target else [IGNORE_INDEX] * len(ids)
        self.weights += [weight if target else 0.0] * len(ids)

    def add_image(
        self, codes: Tensor, layout: VocabLayout, target: bool, text_w: float, image_w: float
    ) -> None:
        self.add([layout.boi_id], target, text_w)
        self.add(_image_ids(codes, layout), target, image_w)
        self.add([layout.eoi_id], target, text_w)

    def build(self) -> Example:
        return Example(self.ids, self.labels, self.weights, self.task)


def _image_ids(codes: Tensor, layout: VocabLayout) -> list[int]:
    """Codes [h, w] -> row-major joint ids."""
    codes = torch.as_tensor(codes)
    if tuple(codes.shape) != layout.grid:
        raise ValueError(
            f"image codes have shape {tuple(codes.shape)} but the vocabulary's grid is "
            f"{layout.grid}: pass one image's codes [h, w] from the matching image tokenizer"
        )
    return layout.codes_to_ids(rearrange(codes, "h w -> (h w)")).tolist()


def _text_ids(ids: Sequence[int], layout: VocabLayout) -> list[int]:
    """Validate caption ids: base-vocabulary tokens only."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < layout.text_vocab_size]
    if bad:
        raise ValueError(
            f"caption ids must be text tokens in [0, {layout.text_vocab_size}), got {bad[:5]}: "
            f"encode captions with JointTokenizer.encode_text"
        )
    return ids


def t2i_prefix(
    caption_ids: Sequence[int], layout: VocabLayout, prefix_length: int | None = None
) -> list[int]:
    """The conditioning part of a t2i sequence (everything before boi), shared by training,
    decoding and the export's processor (`vqgpt.export.hub.processing_vqgpt.t2i_prefix`):
    `eos caption`, left-padded with eos to `prefix_length` tokens when that is set.

    Caption ids must be text tokens; a caption longer than `prefix_length - 1` tokens is a
    ValueError (training cuts it first).
    """
    return hub_t2i_prefix(_text_ids(caption_ids, layout), layout.eos_id, prefix_length)


def build_t2i(
    codes: Tensor, caption_ids: Sequence[int], layout: VocabLayout, cfg: SequenceConfig
) -> Example:
    """`eos caption boi codes eoi eos`; targets: boi, codes, eoi, eos (the caption conditions).

    With `cfg.t2i_prefix_length` the caption is left-padded with eos (see `t2i_prefix`), its
    tail cut when it is longer than the prefix allows.
    """
    text_w = cfg.text_loss_weight * cfg.t2i_weight
    image_w = cfg.image_loss_weight * cfg.t2i_weight
    prefix = cfg.t2i_prefix_length
    caption_ids = list(caption_ids) if prefix is None else list(caption_ids)[: prefix - 1]
    b = _Builder("t2i")
    b.add(t2i_prefix(caption_ids, layout, prefix), target=False)
    b.add_image(codes, layout, True, text_w, image_w)
    b.add([layout.eos_id], True, text_w)
    return b.build()


def build_caption(
    codes: Tensor, caption_ids: Sequence[int], layout: VocabLayout, cfg: SequenceConfig
) -> Example:
    """`eos boi codes eoi caption eos`; targets: caption, eos (the image conditions)."""
    text_w = cfg.text_loss_weight * cfg.caption_weight
    b = _Builder("caption")
    b.add([layout.eos_id], target=False)
    b.add_image(codes, layout, False, 0.0, 0.0)
    b.add(_text_ids(caption_ids, layout), True, text_w)
    b.add([layout.eos_id], True, text_w)
    return b.build()


def build_document(
    segments: Sequence[str | Sequence[int] | Tensor],
    layout: VocabLayout,
    tokenizer: TextEncoder | None,
    cfg: SequenceConfig | None = None,
) -> Example:
    """`eos doc seg_1 .. seg_n eos` from text (str, or its BPE ids as a list) and image (codes
    [h, w]) segments; every segment token and the final eos are targets. `doc` (`<|doc|>`) is
    there when the layout has it (`layout.doc_id`), and conditions (no target). `tokenizer`
    encodes str segments (None: there are none)."""
    text_w = cfg.text_loss_weight if cfg else 1.0
    image_w = cfg.image_loss_weight if cfg else 1.0
    b = _Builder("document")
    b.add([layout.eos_id], target=False)
    if layout.doc_id is not None:
        b.add([layout.doc_id], target=False)
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            if tokenizer is None:
                raise TypeError(f"document segment {i} is text: pass a tokenizer to encode it")
            b.add(tokenizer.encode_text(seg), True, text_w)
        elif isinstance(seg, Tensor):
            b.add_image(seg, layout, True, text_w, image_w)
        elif isinstance(seg, (list, tuple)):
            b.add(_text_ids(seg, layout), True, text_w)
        else:
            raise TypeError(
                f"document segment {i} must be str, text ids or a codes tensor, got {type(seg)}"
            )
    b.add([layout.eos_id], True, text_w)
    return b.build()


def make_example(
    codes: Tensor,
    text_ids: Sequence[int],
    layout: VocabLayout,
    cfg: SequenceConfig,
    rng: random.Random,
) -> Example:
    """t2i with probability `t2i_ratio` (caption dropped w.p. `caption_dropout`), else captioning."""
    if rng.random() < cfg.t2i_ratio:
        drop = rng.random() < cfg.caption_dropout
        return build_t2i(codes, [] if drop else text_ids, layout, cfg)
    return build_caption(codes, text_ids, layout, cfg)


# ---------------------------------------------------------------------------------------------
# truncation and packing


def _image_spans(ids: Sequence[int], layout: VocabLayout) -> list[tuple[int, int]]:
    """[start, end) of every `boi .. eoi` run (an unclosed one runs to the end)."""
    spans, start = [], None
    for i, tok in enumerate(ids):
        if tok == layout.boi_id:
            start = i
        elif tok == layout.eoi_id and start is not None:
            spans.append((start, i + 1))
            start = None
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def truncate(example: Example, max_length: int, layout: VocabLayout) -> Example | None:
    """Shorten to `max_length` without splitting an image; None when no target would remain.

    t2i: the caption's tail is cut so the whole image still fits (None if the image does not fit,
    or no caption token would be left, which would silently mimic caption dropout).
    Other tasks: the sequence's tail is cut; a cut that would split an image moves to before it,
    dropping the image and everything after.
    """
    n = len(example)
    if n <= max_length:
        return example
    spans = _image_spans(example.input_ids, layout)
    if example.task == "t2i" and spans:
        boi = spans[0][0]
        keep = boi - (n - max_length)  # positions [0, keep) then [boi, n)
        if keep < 2:  # leading eos plus at least one caption token
            return None
        ex = example[:keep]
        tail = example[boi:]
        return Example(
            ex.input_ids + tail.input_ids,
            ex.labels + tail.labels,
            ex.loss_weights + tail.loss_weights,
            example.task,
            ex.task_ids + tail.task_ids,
        )
    cut = max_length
    for start, end in spans:
        if start < cut < end:
            cut = start
            break
    ex = example[:cut]
    return ex if ex.num_targets else None


def pack(examples: Iterable[Example], max_length: int, pad_id: int) -> list[Example]:
    """Greedily fill windows of exactly `max_length` with whole examples; pad tails with `pad_id`.

    Examples follow one another directly (each starts with the eos that separates it from the
    one before); padding has label -100, weight 0 and task id -1. Truncate long examples first.
    """
    return list(iter_pack(examples, max_length, pad_id))


def iter_pack(examples: Iterable[Example], max_length: int, pad_id: int) -> Iterator[Example]:
    """`pack` one window at a time: a window is out as soon as the next example does not fit it."""
    current: list[Example] = []
    used = 0

    def window() -> Example:
        pad = max_length - used
        tasks = {ex.task for ex in current}
        return Example(
            [i for ex in current for i in ex.input_ids] + [pad_id] * pad,
            [i for ex in current for i in ex.labels] + [IGNORE_INDEX] * pad,
            [w for ex in current for w in ex.loss_weights] + [0.0] * pad,
            tasks.pop() if len(tasks) == 1 else "mixed",
            [t for ex in current for t in ex.task_ids] + [PAD_TASK] * pad,
        )

    for ex in examples:
        if len(ex) > max_length:
            raise ValueError(
                f"an example of {len(ex)} tokens does not fit max_length={max_length}: "
                f"truncate() it first (or use fit())"
            )
        if used + len(ex) > max_length:
            yield window()
            current, used = [], 0
        current.append(ex)
        used += len(ex)
    if current:
        yield window()


class Fitted(NamedTuple):
    """Examples ready for `collate`, and how many were skipped as too long to keep."""

    examples: list[Example]
    skipped: int


def fit(examples: Iterable[Example], layout: VocabLayout, cfg: SequenceConfig) -> Fitted:
    """Truncate each example to `cfg.max_length` (counting skips), then pack if `cfg.pack`."""
    stream = FitStream(examples, layout, cfg)
    return Fitted(list(stream), stream.skipped)


class FitStream:
    """`fit` one window at a time, for an epoch too large to hold: iterate it (once) for the
    windows; `skipped` counts the examples left out as too long so far."""

    def __init__(self, examples: Iterable[Example], layout: VocabLayout, cfg: SequenceConfig):
        self.examples, self.layout, self.cfg = examples, layout, cfg
        self.skipped = 0

    def _kept(self) -> Iterator[Example]:
        for example in self.examples:
            cut = truncate(example, self.cfg.max_length, self.layout)
            if cut is None:
                self.skipped += 1
            else:
                yield cut

    def __iter__(self) -> Iterator[Example]:
        kept = self._kept()
        return iter_pack(kept, self.cfg.max_length, self.layout.eos_id) if self.cfg.pack else kept


# ---------------------------------------------------------------------------------------------
# batching


def noisy_context(example: Example, layout: VocabLayout, max_ratio: float, rng) -> Example:
    """`example` with some image-code inputs replaced by random codes (`image_input_noise`).

    r ~ U(0, max_ratio) for the row; each input position that holds an image code *and* is a
    target (labels != -100: the codes the row draws, not the ones a caption reads) becomes a code
    drawn uniformly from [0, K) with probability r. Labels and loss weights are unchanged, so
    position t still learns the true code t + 1 from a context with wrong codes in it. `rng` is a
    `random.Random` (the caller seeds it; the draws depend on nothing else). A row with no such
    position, or max_ratio 0, comes back as it is.

    Source: the "switch" mode of `perturb_input_tokens` in reAR (He et al., "Rethinking Visual
    Autoregressive Models via Generator-Tokenizer Consistency Regularization", 2025,
    github.com/QY-H00/reAR), for exposure bias; its embedding regulariser is not included.
    """
    lo, hi = layout.image_offset, layout.vocab_size
    spots = [
        i
        for i, (t, y) in enumerate(zip(example.input_ids, example.labels, strict=True))
        if lo <= t < hi and y != IGNORE_INDEX
    ]
    if not spots or max_ratio <= 0:
        return example
    ratio = rng.random() * max_ratio
    ids = list(example.input_ids)
    for i in spots:
        if rng.random() < ratio:
            ids[i] = lo + rng.randrange(hi - lo)
    return Example(ids, example.labels, example.loss_weights, example.task, example.task_ids)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example: input_ids, labels, loss_weights, attention_mask, task_ids."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex) for ex in examples)

    def padded(rows: list[list], fill: float, dtype: torch.dtype) -> Tensor:
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=dtype)

    task_ids = padded([ex.task_ids for ex in examples], PAD_TASK, torch.long)
    return {
        "input_ids": padded([ex.input_ids for ex in examples], pad_id, torch.long),
        "labels": padded([ex.labels for ex in examples], IGNORE_INDEX, torch.long),
        "loss_weights": padded([ex.loss_weights for ex in examples], 0.0, torch.float32),
        # packing pads carry task id -1: they, like collate's padding, are not attended
        "attention_mask": (task_ids != PAD_TASK).long(),
        "task_ids": task_ids,
    }


__all__ = [
    "IMAGE_CAPTION_FRAME",
    "IGNORE_INDEX",
    "PAD_TASK",
    "TASKS",
    "TASK_IDS",
    "Example",
    "FitStream",
    "Fitted",
    "SequenceConfig",
    "SequenceLengthError",
    "TokenBudget",
    "build_caption",
    "build_document",
    "build_t2i",
    "collate",
    "fit",
    "iter_pack",
    "make_example",
    "noisy_context",
    "pack",
    "t2i_prefix",
    "check_length",
    "token_budget",
    "truncate",
]
