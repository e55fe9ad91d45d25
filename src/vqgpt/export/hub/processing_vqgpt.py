"""Processor of a vqgpt export: images and text <-> the joint token sequences the GPT-2 reads.

Self-contained remote code (imports torch and transformers), and the one implementation of the
token-id layout (`TokenLayout`, which vqgpt's `VocabLayout` extends) and of the text-to-image
prefix (`t2i_prefix`, which vqgpt's training sequences and decoding use). The joint vocabulary is GPT-2's
ids 0..text_vocab_size-1 (the last is `<|endoftext|>`, "eos"), then the special tokens
(`<|boi|>`, `<|eoi|>`, and `<|doc|>` in a model trained on interleaved documents), then one token
per image code: `id = image_offset + code`. Sequences:

    captioning     eos boi codes eoi [caption eos]     (the bracket: with text, for training)
    text-to-image  eos caption boi [codes eoi eos]     (the bracket: with images)
    document       eos doc seg_1 .. seg_n [eos]        (vqgpt's document continuation)

Image codes are flattened row-major. The layout comes from `processor_config.json` and is
checked against the tokenizer on load. When the model was trained with a fixed t2i prefix
(`t2i_prefix_length` P in `processor_config.json`), `eos caption` is left-padded with eos to P
tokens, so `boi` is always token P, as in training; a longer caption is an error, or is cut to
its first `max_caption_tokens` tokens with `truncation=True`.

Text is always text: special and image token strings typed in a caption stay plain GPT-2 text
(the processor inserts `boi`, `eoi` and image tokens by id). The output holds exactly what
`generate` takes: `input_ids` and `attention_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

BOI_TOKEN = "<|boi|>"
EOI_TOKEN = "<|eoi|>"
EOS_TOKEN = "<|endoftext|>"
DOC_TOKEN = "<|doc|>"  # opens an interleaved document (only in models trained on documents)
TASKS = ("caption", "t2i")


@dataclass(frozen=True)
class TokenLayout:
    """Where text, special and image tokens live in the joint id space (`vqgpt_vocab.json`)."""

    codebook_size: int  # K, the image tokenizer's codebook size
    grid: tuple[int, int]  # (h, w) token grid of one image
    text_vocab_size: int = 50257  # the base BPE's size; its last id is <|endoftext|>
    special_tokens: tuple[str, ...] = (BOI_TOKEN, EOI_TOKEN)

    def __post_init__(self) -> None:
        # frozen: normalise list inputs (JSON) through object.__setattr__
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    @property
    def eos_id(self) -> int:
        """`<|endoftext|>`: BOS, EOS and pad."""
        return self.text_vocab_size - 1

    @property
    def boi_id(self) -> int:
        """`<|boi|>`: begin of image."""
        return self.text_vocab_size + self.special_tokens.index(BOI_TOKEN)

    @property
    def eoi_id(self) -> int:
        """`<|eoi|>`: end of image."""
        return self.text_vocab_size + self.special_tokens.index(EOI_TOKEN)

    @property
    def doc_id(self) -> int | None:
        """`<|doc|>`: opens a document (after eos), so that a document that starts with an image
        is not a captioning prompt; None in a layout without it (trained without documents)."""
        if DOC_TOKEN not in self.special_tokens:
            return None
        return self.text_vocab_size + self.special_tokens.index(DOC_TOKEN)

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.text_vocab_size + len(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        """Ids in the joint vocabulary (the LM may pad its embedding past this)."""
        return self.image_offset + self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        """h * w image tokens per image."""
        return self.grid[0] * self.grid[1]


def t2i_prefix(caption_ids: list[int], eos_id: int, prefix_length: int | None) -> list[int]:
    """The conditioning part of a text-to-image sequence (everything before boi): `eos caption`,
    left-padded with eos to `prefix_length` tokens when that is set (the model was trained so).

    A caption longer than `prefix_length - 1` tokens is a ValueError.
    """
    if prefix_length is None:
        return [eos_id, *caption_ids]
    if len(caption_ids) > prefix_length - 1:
        raise ValueError(
            f"a caption of {len(caption_ids)} tokens does not fit t2i_prefix_length="
            f"{prefix_length} (eos + at most {prefix_length - 1} caption tokens); shorten it"
        )
    return [eos_id] * (prefix_length - len(caption_ids)) + list(caption_ids)


class VQGPTProcessor(ProcessorMixin):
    """Image processor + joint tokenizer: builds captioning / text-to-image `input_ids`."""

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        layout: dict | None = None,
        t2i_prefix_length: int | None = None,
    ) -> None:
        super().__init__(image_processor, tokenizer)
        if layout is None:
            raise ValueError("VQGPTProcessor needs `layout` (the vqgpt_vocab.json contents)")
        self.layout = dict(layout)
        self.t2i_prefix_length = t2i_prefix_length
        self._check_tokenizer()

    # -- the layout ---------------------------------------------------------------------------

    @property
    def ids(self) -> TokenLayout:
        """The id layout of `self.layout`."""
        return TokenLayout(**self.layout)

    @property
    def text_vocab_size(self) -> int:
        """Ids [0, text_vocab_size) are GPT-2 text; the last of them is `<|endoftext|>`."""
        return self.ids.text_vocab_size

    @property
    def eos_id(self) -> int:
        """`<|endoftext|>`: BOS, EOS and pad."""
        return self.ids.eos_id

    @property
    def boi_id(self) -> int:
        """`<|boi|>`: begin of image."""
        return self.ids.boi_id

    @property
    def eoi_id(self) -> int:
        """`<|eoi|>`: end of image."""
        return self.ids.eoi_id

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.ids.image_offset

    @property
    def codebook_size(self) -> int:
        """K image codes."""
        return self.ids.codebook_size

    @property
    def vocab_size(self) -> int:
        """Ids in the joint vocabulary (the LM may pad its embedding past this)."""
        return self.ids.vocab_size

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) image tokens per image."""
        return self.ids.grid

    @property
    def max_caption_tokens(self) -> int:
        """The most caption tokens a text-to-image prompt takes: P - 1 with a fixed prefix of P
        tokens, else what fits the model's context (`tokenizer.model_max_length`) beside an
        image (`eos caption boi codes eoi`)."""
        if self.t2i_prefix_length is not None:
            return self.t2i_prefix_length - 1
        return int(self.tokenizer.model_max_length) - self.ids.tokens_per_image - 3

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        expected = {
            EOS_TOKEN: self.eos_id,
            BOI_TOKEN: self.boi_id,
            EOI_TOKEN: self.eoi_id,
            "<|img_00000|>": self.image_offset,
        }
        got = {t: tok.convert_tokens_to_ids(t) for t in expected}
        if got != expected or len(tok) != self.vocab_size:
            raise ValueError(
                f"the tokenizer does not fit the vqgpt layout {self.layout}: expected ids "
                f"{expected} and {self.vocab_size} tokens, got {got} and {len(tok)} tokens"
            )

    # -- encoding -----------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        """GPT-2 ids of each text; special-token strings inside it count as plain text."""
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]

    def image_ids(self, codes: Any) -> list[list[int]]:
        """Codes [B, h, w] -> per image the h*w token ids, row-major."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(
                f"image codes must be an integer tensor [B, {self.grid[0]}, {self.grid[1]}], got "
                f"{codes.dtype} {tuple(codes.shape)} (residual codes [B, h, w, L] have no tokens)"
            )
        k = self.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"image codes must lie in [0, {k}), got {codes.min()}..{codes.max()}")
        return (codes.long().reshape(codes.shape[0], -1) + self.image_offset).tolist()

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        *,
        task: str | None = None,
        image_codes: Any = None,
        image_tokenizer: Any = None,
        truncation: bool = False,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Images and/or text -> `input_ids` and `attention_mask` (left-padded with eos), the
        arguments `generate` takes.

        task "caption": `eos boi codes eoi`, plus `caption eos` when text is given.
        task "t2i": `eos caption boi`, plus `codes eoi eos` when images are given.
        Without `task`: images alone mean captioning, text alone text-to-image.
        Images become codes through `image_tokenizer` (the exported image tokenizer, loaded with
        AutoModel); or pass `image_codes` [B, h, w] directly (`image_processor(images)` gives
        the pixels). For task "t2i", a caption longer than `max_caption_tokens` raises a
        ValueError, or with `truncation=True` keeps its first `max_caption_tokens` tokens.
        """
        data: dict[str, Any] = {}
        codes = image_codes
        if images is not None and codes is None:
            pixels = self.image_processor(images)["pixel_values"]  # (B, 3, S, S)
            if image_tokenizer is None:
                raise ValueError(
                    "images become tokens through the image tokenizer: pass image_tokenizer="
                    "AutoModel.from_pretrained(<export>, subfolder='image_tokenizer', "
                    "trust_remote_code=True), or image_codes=<codes [B, h, w]>"
                )
            device = next(image_tokenizer.parameters()).device
            codes = image_tokenizer.encode(pixels.to(device)).cpu()
        if codes is not None:
            codes = torch.as_tensor(codes)
            codes = codes[None] if codes.ndim == 2 else codes
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        if task is None:
            if (codes is None) == (texts is None):
                raise ValueError(
                    "give task='caption' or task='t2i' together with both images and text "
                    "(and pass at least one of them)"
                )
            task = "caption" if texts is None else "t2i"
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "caption" and codes is None:
            raise ValueError("task='caption' needs images (or image_codes)")
        if task == "t2i" and texts is None:
            raise ValueError("task='t2i' needs text (an empty string for the unconditional prompt)")
        image_rows = None if codes is None else self.image_ids(codes)
        text_rows = None if texts is None else self.encode_text(texts)
        if task == "t2i" and truncation:
            text_rows = [row[: self.max_caption_tokens] for row in text_rows]
        if image_rows is not None and text_rows is not None and len(image_rows) != len(text_rows):
            raise ValueError(f"{len(image_rows)} images but {len(text_rows)} texts")
        if task == "t2i" and any(len(r) > self.max_caption_tokens for r in text_rows):
            longest = max(len(r) for r in text_rows)
            raise ValueError(
                f"a caption of {longest} tokens is longer than this model's text-to-image prompt "
                f"takes ({self.max_caption_tokens} tokens); shorten it, or pass truncation=True "
                "to keep its first tokens"
            )
        eos, boi, eoi = self.eos_id, self.boi_id, self.eoi_id
        rows = []
        for i in range(len(image_rows if image_rows is not None else text_rows)):
            if task == "caption":
                row = [eos, boi, *image_rows[i], eoi]
                row += [] if text_rows is None else [*text_rows[i], eos]
            else:
                row = [*t2i_prefix(text_rows[i], eos, self.t2i_prefix_length), boi]
                row += [] if image_rows is None else [*image_rows[i], eoi, eos]
            rows.append(row)
        length = max(len(r) for r in rows)
        data["input_ids"] = [[eos] * (length - len(r)) + r for r in rows]
        data["attention_mask"] = [[0] * (length - len(r)) + [1] * len(r) for r in rows]
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -- decoding -----------------------------------------------------------------------------

    def decode_image_tokens(self, ids: Any) -> torch.Tensor:
        """Token ids [T] or [B, T] -> codes [B, h, w]: each row's image tokens, in order.

        Text, special and padding ids are skipped; a row must hold exactly h*w image tokens.
        """
        ids = torch.as_tensor(ids).long()
        ids = ids[None] if ids.ndim == 1 else ids
        h, w = self.grid
        out = []
        for i, row in enumerate(ids):
            image = row[(row >= self.image_offset) & (row < self.vocab_size)]
            if image.numel() != h * w:
                raise ValueError(
                    f"row {i} holds {image.numel()} image tokens; an image is h*w = {h * w}"
                )
            out.append((image - self.image_offset).reshape(h, w))
        return torch.stack(out)  # (B, h, w)

    def decode_text(self, ids: Any) -> str | list[str]:
        """Text of ids [T] (a str) or [B, T] (a list), skipping eos, special and image tokens."""
        ids = torch.as_tensor(ids).long()
        if ids.ndim == 2:
            return [self.decode_text(row) for row in ids]
        keep = [i for i in ids.tolist() if 0 <= i < self.text_vocab_size and i != self.eos_id]
        return self.tokenizer.decode(keep, clean_up_tokenization_spaces=False)
