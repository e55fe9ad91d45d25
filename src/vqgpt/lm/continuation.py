"""Continuing an interleaved document: text, then images of exactly h*w codes, then text again.

A prompt is a document as training builds it (`sequences.build_document`) without its closing
eos: `eos seg_1 .. seg_n`, images as `boi codes eoi`. Each row then runs a small state machine
over one KV cache (`KVDecoder`, dynamic):

    text    text ids and `<|boi|>` allowed (image ids and `<|eoi|>` masked out);
            `<|endoftext|>` ends the document, `<|boi|>` opens an image
    image   h*w steps over the image ids only (the narrow head when every running row is in an
            image), with classifier-free guidance when cfg_scale != 1
    eoi     `<|eoi|>` forced, not sampled; then text again

The unconditional branch of an image is `t2i_prefix([]) + boi` (`eos boi`, eos-padded to the
model's t2i_prefix_length) followed by the codes drawn so far: exactly the caption-dropped
text-to-image sequence that training's caption dropout teaches (`eos boi codes`). A document
with its text dropped is never a training sequence, so nothing teaches the model what it would
mean. `unconditional="previous_image"` takes instead the document up to its last image's `<|eoi|>`
(then `<|boi|>`), so that guidance pushes by the text written since that image (the
instruction of a change; InstructPix2Pix's text guidance, Brooks et al. 2023): the context of
an image drawn before its own text, which documents train; a document without an image yet
gets the caption-dropped branch. Measured on shapes stories (docs/results.md,
issue 14): change images 12.6 -> 16.3% at scale 1.5, within one draw's noise. Each row opening
an image gets its own one-row decoder for that branch (rows open images at
different steps, and a cache row cannot be restarted in a batch); it is dropped at `<|eoi|>`.

A row stops at `<|endoftext|>` ("eos"), after `max_new_tokens` generated tokens
("max_new_tokens"), when the sequence fills the model's n_positions ("n_positions"), or when it
opens an image it may not finish: `<|boi|>` chosen after `max_images` images ("max_images") or
with no room left for h*w codes and `<|eoi|>` (the token budget or n_positions; that `<|boi|>` is
not kept). So an image is always whole. Randomness is per row (`sampling.row_generators`): a row's
tokens depend on the seed and its index, not on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from vqgpt.lm.decoding import (
    KVDecoder,
    NarrowHead,
    inference,
    max_positions,
    narrow_head,
    vocab_width,
)
from vqgpt.lm.sampling import (
    SamplingConfig,
    base_seed,
    image_token_mask,
    next_token_scores,
    pick,
    row_generators,
    text_token_mask,
)
from vqgpt.lm.sequences import SequenceLengthError, TextEncoder, build_document, t2i_prefix
from vqgpt.lm.vocab import VocabLayout

STOP_REASONS = ("eos", "max_new_tokens", "max_images", "n_positions")
# the unconditional branch of a guided image: "caption_dropped" (`eos boi`, the module docstring)
# or "previous_image" (the document up to its last image's `<|eoi|>`, then `boi`: guidance by
# the text written since that image; "caption_dropped" for a document's first image)
UNCONDITIONAL_BRANCHES = ("caption_dropped", "previous_image")


class Continuation(NamedTuple):
    """What `continue_document_ids` generated for one prompt."""

    tokens: list[int]  # new ids: text, boi codes eoi, and the closing eos when it stopped there
    images: int  # whole images among them
    stop: str  # one of STOP_REASONS


def document_prompt(
    segments: Sequence[str | Tensor], layout: VocabLayout, tokenizer: TextEncoder
) -> list[int]:
    """`eos [doc] seg_1 .. seg_n` (text, or image codes [h, w]): `build_document` without its
    last eos (`<|doc|>` when the layout has it)."""
    return build_document(segments, layout, tokenizer).input_ids[:-1]


def check_document_prompt(ids: Sequence[int], layout: VocabLayout, n_positions: int) -> None:
    """A ValueError (one line) unless `ids` are joint ids with whole images only, ending outside
    an image, with room for at least one new token in `n_positions`."""
    h, w = layout.grid
    bad = [i for i in ids if not 0 <= i < layout.vocab_size]
    if bad:
        raise ValueError(f"the prompt holds ids outside the vocabulary [0, {layout.vocab_size}): {bad[:5]}")  # fmt: skip
    codes, images = None, 0  # codes: None outside an image, else the codes of the open one
    for i in ids:
        if i == layout.boi_id:
            if codes is not None:
                raise ValueError(f"the prompt opens an image inside image {images + 1} (<|boi|> twice)")  # fmt: skip
            codes = 0
        elif i == layout.eoi_id:
            if codes is None:
                raise ValueError("the prompt closes an image it did not open (<|eoi|> without <|boi|>)")  # fmt: skip
            if codes != h * w:
                raise ValueError(
                    f"image {images + 1} of the prompt has {codes} codes, the model's images have "
                    f"{h * w} ({h}x{w})"
                )
            codes, images = None, images + 1
        elif layout.image_offset <= i:
            if codes is None:
                raise ValueError("the prompt holds image tokens outside <|boi|> .. <|eoi|>")
            codes += 1
        elif codes is not None:
            raise ValueError(f"image {images + 1} of the prompt holds a text token ({i})")
    if codes is not None:
        raise ValueError(
            f"the prompt ends inside an image (an unclosed <|boi|> after {codes} of {h * w} "
            "codes): close it with all its codes and <|eoi|>, or end the prompt before it; the "
            "generator opens images itself"
        )
    if len(ids) >= n_positions:
        raise SequenceLengthError(
            f"the prompt has {len(ids)} tokens, but the model's n_positions={n_positions} leaves "
            "no room to continue it; shorten the prompt"
        )


class _Widen:
    """Narrow-head logits [N, C] -> full width [N, V] (-inf on the columns not computed)."""

    def __init__(self, head: NarrowHead | None, width: int) -> None:
        self.head, self.width = head, width

    def __call__(self, logits: Tensor, narrow: bool) -> Tensor:
        if not narrow or self.head is None:
            return logits
        full = logits.new_full((logits.shape[0], self.width), float("-inf"))
        full[:, self.head.columns] = logits
        return full


def continue_document_ids(
    model: nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 256,
    max_images: int = 4,
    unconditional: str = "caption_dropped",
) -> list[Continuation]:
    """Continue each prompt (joint ids, `document_prompt`), `sampling.batch_size` rows a batch.

    Temperature, top-k, top-p and the seed apply to every sampled token, `cfg_scale` to image
    codes only (see the module docstring for the unconditional branch and the stop rules).
    Prompts are checked first (`check_document_prompt`): a ValueError names the bad one.
    """
    sampling = sampling or SamplingConfig()
    if sampling.num_beams != 1 or sampling.rerank != 1:
        raise ValueError("document continuation samples or decodes greedily: no beams, no rerank")
    if unconditional not in UNCONDITIONAL_BRANCHES:
        raise ValueError(
            f"unconditional branch {unconditional!r} is unknown; known: {list(UNCONDITIONAL_BRANCHES)}"
        )
    if max_new_tokens < 1 or max_images < 0:
        raise ValueError(
            f"need max_new_tokens >= 1 and max_images >= 0, got {max_new_tokens}, {max_images}"
        )
    n_positions = max_positions(model)
    for k, ids in enumerate(prompts):
        try:
            check_document_prompt(list(ids), layout, n_positions)
        except ValueError as err:
            raise type(err)(f"prompt {k}: {err}") from None
    out: list[Continuation] = []
    with inference(model):
        for start in range(0, len(prompts), sampling.batch_size):
            batch = [list(p) for p in prompts[start : start + sampling.batch_size]]
            rows = range(start, start + len(batch))
            out += _continue_batch(
                model, layout, batch, rows, sampling, max_new_tokens, max_images, unconditional
            )
    return out


def _continue_batch(
    model: nn.Module,
    layout: VocabLayout,
    prompts: list[list[int]],
    row_ids: Sequence[int],
    sampling: SamplingConfig,
    max_new: int,
    max_images: int,
    unconditional: str,
) -> list[Continuation]:
    n, hw, n_positions = len(prompts), layout.tokens_per_image, max_positions(model)
    device, width = next(model.parameters()).device, vocab_width(model)
    text_ok = text_token_mask(layout, width, device)
    text_ok[layout.boi_id] = True
    image_ok = image_token_mask(layout, width, device)
    head = narrow_head(model, image_ok)
    widen = _Widen(head, width)
    guided = sampling.cfg_scale != 1.0
    uncond_prompt = [*t2i_prefix([], layout, getattr(model.config, "t2i_prefix_length", None))]
    uncond_prompt.append(layout.boi_id)
    generators = None
    if sampling.do_sample:
        generators = row_generators(base_seed(sampling), row_ids, device)

    decoder = KVDecoder(model, "dynamic")
    logits = decoder.start(prompts, layout.eos_id, max_new)  # (n, V)
    tokens: list[list[int]] = [[] for _ in range(n)]
    length = [len(p) for p in prompts]  # the whole sequence so far
    codes: list[int | None] = [None] * n  # None: text; else codes of the open image so far
    images = [0] * n
    stop: list[str | None] = [None] * n
    uncond: dict[int, tuple[KVDecoder, Tensor]] = {}  # row -> its branch and its last logits

    def choose(rows: list[int], allowed: Tensor, cond: Tensor) -> list[int]:
        """Pick one token for each of `rows` from their conditional logits `cond` [len, V]."""
        if not rows:
            return []
        with_uncond = guided and allowed is image_ok
        if with_uncond:
            cond = torch.cat([cond, torch.cat([uncond[r][1] for r in rows])])
        scores = next_token_scores(cond, allowed, sampling, with_uncond)
        gens = None if generators is None else [generators[r] for r in rows]
        return pick(scores, sampling, gens).tolist()

    for _ in range(max_new):
        running = [r for r in range(n) if stop[r] is None]
        text_rows = [r for r in running if codes[r] is None]
        image_rows = [r for r in running if codes[r] is not None and codes[r] < hw]
        chosen = dict(zip(text_rows, choose(text_rows, text_ok, logits[text_rows]), strict=True))
        picked = choose(image_rows, image_ok, logits[image_rows])
        chosen.update(zip(image_rows, picked, strict=True))
        chosen.update({r: layout.eoi_id for r in running if codes[r] == hw})  # forced
        for r in running:
            token = chosen[r]
            if token == layout.boi_id:
                if images[r] == max_images:
                    stop[r] = "max_images"
                elif len(tokens[r]) + hw + 2 > max_new:
                    stop[r] = "max_new_tokens"
                elif length[r] + hw + 2 > n_positions:
                    stop[r] = "n_positions"
                if stop[r] is not None:
                    continue  # an image it could not finish: not opened
                codes[r] = 0
                if guided:
                    branch = KVDecoder(model, "dynamic", head)
                    branch_prompt = uncond_prompt
                    if unconditional == "previous_image":
                        so_far = prompts[r] + tokens[r]
                        if layout.eoi_id in so_far:
                            last = len(so_far) - 1 - so_far[::-1].index(layout.eoi_id)
                            branch_prompt = [*so_far[: last + 1], layout.boi_id]
                    first = widen(branch.start([branch_prompt], layout.eos_id, hw), True)
                    uncond[r] = (branch, first)
            elif token == layout.eoi_id:
                codes[r], images[r] = None, images[r] + 1
                uncond.pop(r, None)
            elif codes[r] is not None:
                codes[r] += 1
                if guided and codes[r] < hw:  # the last code's logits are never read
                    branch = uncond[r][0]
                    step = branch.step(torch.tensor([token], device=device))
                    uncond[r] = (branch, widen(step, True))
            tokens[r].append(token)
            length[r] += 1
            if token == layout.eos_id and codes[r] is None:
                stop[r] = "eos"
            elif len(tokens[r]) == max_new:
                stop[r] = "max_new_tokens"
            elif length[r] == n_positions:
                stop[r] = "n_positions"
        running = [r for r in range(n) if stop[r] is None]
        if not running:
            break
        # every running row drawing a code next: the image rows of the output layer suffice
        narrow = head is not None and all(codes[r] is not None and codes[r] < hw for r in running)
        decoder.head = head if narrow else None
        fed = [chosen.get(r, layout.eos_id) if stop[r] is None else layout.eos_id for r in range(n)]
        logits = widen(decoder.step(torch.tensor(fed, device=device)), narrow)
        # rows that stopped are fed eos while others run on: keep their (unread) positions inside
        # the position table; a running row's never reach the end (it stops there)
        decoder.tracker.clamp(n_positions - 1)
    for r in range(n):  # the loop ran out only with max_new steps taken
        stop[r] = stop[r] or "max_new_tokens"
    return [Continuation(tokens[r], images[r], stop[r]) for r in range(n)]


def split_continuation(tokens: Sequence[int], layout: VocabLayout) -> list[list[int] | Tensor]:
    """New ids -> segments in order: text ids (a list; eos dropped) or image codes [h, w]."""
    h, w = layout.grid
    segments: list[list[int] | Tensor] = []
    text: list[int] = []
    image: list[int] | None = None
    for t in tokens:
        if t == layout.boi_id:
            if text:
                segments.append(text)
            text, image = [], []
        elif t == layout.eoi_id:
            codes = layout.ids_to_codes(torch.tensor(image))
            segments.append(rearrange(codes, "(h w) -> h w", h=h, w=w))
            image = None
        elif image is not None:
            image.append(t)
        elif t != layout.eos_id:
            text.append(t)
    if text:
        segments.append(text)
    return segments


__all__ = [
    "STOP_REASONS",
    "Continuation",
    "check_document_prompt",
    "continue_document_ids",
    "document_prompt",
    "split_continuation",
]
