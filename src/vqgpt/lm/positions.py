"""Position ids: every token at its index in the row, or every image's codes at shared positions.

`sequences.image_positions`:

  sequential  GPT-2's own: the t-th real token of a row is at position t (left padding does not
              count). An image opened at token 150 of a document has its codes at 151 ..
              150 + h*w, so the learned position embeddings must learn to draw at every offset.
  shared      code k of any image (k = 0 .. h*w*nq - 1, counted from its `<|boi|>`) is at
              position `offset + k`, wherever the image sits; every other token keeps its index.
              `offset` is where a text-to-image example's first code sits (t2i_prefix_length + 1),
              so the images of captioning rows and documents train the same positions as
              text-to-image, and an image that copies most of the previous one (a story's "then
              the red circle moves to the right") finds each cell's predecessor at its own
              position. A code-level analogue of per-image 2D position embeddings; GPT-2's
              learned absolute positions accept any ids, so the model stays a plain GPT-2.

A model trained with `shared` records it in its config (`config.image_positions`, a dict) and
every forward of it (training, evaluation, decoding, reranking) passes `position_ids(...)`; a model
without the key is sequential, as every model before it. Always pass an attention mask with them:
given position ids and no mask (and no cache), transformers 5 reads every place where the ids do
not rise by one as the start of a new packed sequence, and masks attention across it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

IMAGE_POSITIONS = ("sequential", "shared")


@dataclass(frozen=True)
class ImagePositions:
    """Shared image positions: code k of every image at `offset + k` (see the module docstring)."""

    offset: int  # position of an image's first code
    boi_id: int  # `<|boi|>`: the code count restarts after it
    code_lo: int  # image-code ids are [code_lo, code_hi)
    code_hi: int

    @classmethod
    def of(cls, config: Any) -> ImagePositions | None:
        """The scheme a model config records (`config.image_positions`); None: sequential."""
        data = getattr(config, "image_positions", None)
        return None if data is None else cls(**data)

    @classmethod
    def of_model(cls, model: Any) -> ImagePositions | None:
        """`of` the model's config, through one wrapper (DDP's `.module`) if need be."""
        config = getattr(model, "config", None)
        if config is None:
            config = getattr(getattr(model, "module", None), "config", None)
        return None if config is None else cls.of(config)

    def to_dict(self) -> dict[str, int]:
        """What `config.image_positions` holds (config.json)."""
        return asdict(self)


def position_ids(
    input_ids: Tensor, attention_mask: Tensor | None, scheme: ImagePositions | None
) -> Tensor:
    """Position ids [B, T] of a batch [B, T] (left or right padded; padding's ids are ignored).

    Sequential: the index among the row's real tokens. Shared: image codes at `offset + k`, k
    counted from the last `<|boi|>` before them, the rest sequential.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    seq = _sequential(mask)  # (B, T)
    if scheme is None:
        return seq
    boi_at = _last_boi(input_ids, mask, seq, scheme.boi_id)  # (B, T)
    is_code = (input_ids >= scheme.code_lo) & (input_ids < scheme.code_hi) & (boi_at >= 0)
    return torch.where(is_code, scheme.offset + seq - boi_at - 1, seq)


def _sequential(mask: Tensor) -> Tensor:
    """Index [B, T] of each token among its row's real tokens (padding at 0 or the last index)."""
    return (mask.cumsum(dim=-1) - 1).clamp_min(0)


def _last_boi(input_ids: Tensor, mask: Tensor, seq: Tensor, boi_id: int) -> Tensor:
    """Sequential index [B, T] of the last real `<|boi|>` at or before each token, -1 if none."""
    is_boi = (input_ids == boi_id) & (mask > 0)
    return torch.where(is_boi, seq, torch.full_like(seq, -1)).cummax(dim=-1).values


def forward_position_ids(
    input_ids: Tensor, attention_mask: Tensor | None, scheme: ImagePositions | None
) -> Tensor | None:
    """What a whole-sequence forward passes as `position_ids`: None for a sequential model (its
    forward stays exactly as before the scheme existed), else `position_ids`."""
    return None if scheme is None else position_ids(input_ids, attention_mask, scheme)


class PositionTracker:
    """Position ids of tokens fed one per row at a time (a KV-cache decoding step).

    `start` takes the prompt batch; `next(tokens)` returns the positions [N, 1] of `tokens` [N]
    and advances. Equal to `position_ids` of the whole sequence at every step (tested).
    """

    def __init__(self, scheme: ImagePositions | None) -> None:
        self.scheme = scheme
        self.seq: Tensor | None = None  # (N, 1): index of the next real token
        self.boi_at: Tensor | None = None  # (N, 1): index of the last <|boi|> so far, or -1

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Positions [N, T] of the prompt batch; the tracker continues after it."""
        mask = attention_mask.long()
        self.seq = mask.sum(dim=-1, keepdim=True)
        if self.scheme is not None:
            last = _last_boi(input_ids, mask, _sequential(mask), self.scheme.boi_id)
            self.boi_at = last[:, -1:]
        return position_ids(input_ids, attention_mask, self.scheme)

    def next(self, tokens: Tensor) -> Tensor:
        """Positions [N, 1] of `tokens` [N] (the tokens fed now)."""
        seq = self.seq
        tokens = tokens.reshape(-1, 1)  # (N, 1)
        positions = seq
        if self.scheme is not None:
            s = self.scheme
            self.boi_at = torch.where(tokens == s.boi_id, seq, self.boi_at)
            is_code = (tokens >= s.code_lo) & (tokens < s.code_hi) & (self.boi_at >= 0)
            positions = torch.where(is_code, s.offset + seq - self.boi_at - 1, seq)
        self.seq = seq + 1
        return positions

    def clamp(self, max_position: int) -> None:
        """Keep the next positions at most `max_position` (rows fed on after they stopped)."""
        self.seq = self.seq.clamp(max=max_position)

    def select(self, index: Tensor) -> None:
        """Keep / reorder / repeat rows as `KVDecoder.select` does."""
        self.seq = self.seq[index]
        if self.boi_at is not None:
            self.boi_at = self.boi_at[index]


__all__ = [
    "IMAGE_POSITIONS",
    "ImagePositions",
    "PositionTracker",
    "forward_position_ids",
    "position_ids",
]
