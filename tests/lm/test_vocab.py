"""Joint vocabulary: layout ids, GPT-2 parity, image-token round trips, save / reload, mismatches."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer, GPT2TokenizerFast

from vqgpt.artifacts import LAYOUT_FILE, DamagedFileError, ModelFolderError
from vqgpt.config import ConfigError
from vqgpt.lm.vocab import (
    JointTokenizer,
    VocabLayout,
    VocabMismatchError,
    _gpt2_files,
    image_token,
)

K, GRID = 64, (4, 4)

CORPUS = [
    "Hello world",
    " Hello",
    "",
    " ",
    "a red circle on a blue square",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "whitespace runs:          end",
    "naïve café, Ünïcödé — “quotes” ‘single’ …",
    "emoji 🐍🔥👍🏽 and flags 🇫🇷 zwj 👩‍👩‍👧",
    "中文字符和日本語のテキスト, 한국어",
    "Ελληνικά и русский текст",
    "def f(x):\n    return x ** 2  # code\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "numbers 1234567890 3.14159 -42 1e-4",
    "<|endoftext|>",
    "a caption with <|endoftext|> inside",
    "<|img_00001|> typed in a caption",
    "<|boi|><|img_00003|><|eoi|>",
    "I'm it's we'll they've don't",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


@pytest.fixture(scope="module")
def tok() -> JointTokenizer:
    return JointTokenizer.build(K, GRID)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> GPT2TokenizerFast:
    """transformers' own GPT-2 tokenizer over the same files (special tokens split as text)."""
    folder = tmp_path_factory.mktemp("gpt2_ref")
    vocab, merges = _gpt2_files()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    ref = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(ref) == 50257
    return ref


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("joint")
    tok.save_pretrained(folder)
    return folder


# -- layout -----------------------------------------------------------------------------------


def test_layout_ids():
    layout = VocabLayout(K, GRID)
    assert (layout.eos_id, layout.boi_id, layout.eoi_id) == (50256, 50257, 50258)
    assert layout.image_offset == 50259
    assert layout.vocab_size == 50259 + K
    assert layout.tokens_per_image == 16
    assert layout.added_tokens()[:3] == ["<|boi|>", "<|eoi|>", "<|img_00000|>"]
    assert layout.added_tokens()[-1] == image_token(K - 1) == "<|img_00063|>"


def test_codes_ids_round_trip_and_masks():
    layout = VocabLayout(K, GRID)
    codes = torch.arange(K).reshape(4, 16)
    ids = layout.codes_to_ids(codes)
    assert ids.shape == codes.shape and ids.dtype == torch.long
    assert ids[0, 0] == layout.image_offset and ids[-1, -1] == layout.vocab_size - 1
    assert torch.equal(layout.ids_to_codes(ids), codes)
    probe = torch.tensor([0, 50255, 50256, 50257, 50258, 50259, 50259 + K - 1, 50259 + K])
    assert layout.is_text(probe).tolist() == [True, True, True, False, False, False, False, False]
    assert layout.is_image(probe).tolist() == [False] * 5 + [True, True, False]


@pytest.mark.parametrize("bad", [50256, 50257, 50258, 50259 + K, -1])
def test_ids_to_codes_rejects_non_image_ids(bad):
    layout = VocabLayout(K, GRID)
    with pytest.raises(ValueError, match="not image tokens"):
        layout.ids_to_codes(torch.tensor([50259, bad]))


@pytest.mark.parametrize("codes", [torch.tensor([0, K]), torch.tensor([-1, 0])])
def test_codes_to_ids_rejects_out_of_range(codes):
    with pytest.raises(ValueError, match=f"\\[0, {K}\\)"):
        VocabLayout(K, GRID).codes_to_ids(codes)


def test_codes_to_ids_rejects_float_codes():
    with pytest.raises(TypeError, match="integer"):
        VocabLayout(K, GRID).codes_to_ids(torch.zeros(3))


def test_layout_dict_round_trip_and_validation():
    layout = VocabLayout(K, (2, 8), special_tokens=("<|boi|>", "<|eoi|>", "<|sep|>"))
    again = VocabLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout and again.grid == (2, 8) and again.image_offset == 50260
    with pytest.raises(ConfigError, match="colour"):
        VocabLayout.from_dict({**layout.to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="grid"):
        VocabLayout(K, (0, 4))
    with pytest.raises(ConfigError, match="<\\|eoi\\|>"):
        VocabLayout(K, GRID, special_tokens=("<|boi|>",))
    with pytest.raises(ConfigError, match="clash"):
        VocabLayout(K, GRID, special_tokens=("<|boi|>", "<|eoi|>", "<|img_x|>"))


def test_check_compatible_names_both_sides():
    layout = VocabLayout(K, GRID)
    layout.check_compatible(K, GRID)
    layout.check_compatible(K)
    with pytest.raises(VocabMismatchError) as err:
        layout.check_compatible(512, (8, 8))
    msg = str(err.value)
    assert "codebook_size=64" in msg and "codebook_size=512" in msg
    assert "(4, 4)" in msg and "(8, 8)" in msg and "JointTokenizer.build(512, (8, 8))" in msg
    with pytest.raises(VocabMismatchError, match="grid=\\(2, 8\\)"):
        layout.check_compatible(K, (2, 8))


# -- text parity with GPT-2 -------------------------------------------------------------------


def test_known_gpt2_ids(tok):
    assert tok.encode_text("Hello world") == [15496, 995]
    assert tok.encode_text(" Hello") == [18435]
    assert tok.encode_text("") == []


def test_text_matches_transformers_gpt2(tok, reference):
    batch = tok.encode_texts(CORPUS)
    for text, ids in zip(CORPUS, batch, strict=True):
        want = reference(text, split_special_tokens=True)["input_ids"]
        assert ids == want, text
        assert tok.encode_text(text) == want, text
        # plain text never yields <|endoftext|>, special or image ids
        assert all(0 <= i < tok.layout.eos_id for i in ids), text


def test_literal_special_strings_stay_text(tok):
    ids = tok.encode_text("<|img_00001|><|boi|><|endoftext|>")
    assert len(ids) > 3 and max(ids) < 50256
    assert tok.decode_text(ids) == "<|img_00001|><|boi|><|endoftext|>"


def test_decode_round_trip_and_skips_non_text(tok):
    for text in CORPUS:
        assert tok.decode_text(tok.encode_text(text)) == text
    layout = tok.layout
    mixed = [15496, layout.eos_id, layout.boi_id, layout.image_offset + 5, layout.eoi_id, 995]
    assert tok.decode_text(mixed) == "Hello world"
    assert tok.decode_texts(torch.tensor([mixed, mixed])) == ["Hello world"] * 2


# -- image tokens in the HF tokenizer ---------------------------------------------------------


def test_image_tokens_at_layout_ids(tok):
    layout = tok.layout
    ids = list(range(layout.text_vocab_size, layout.vocab_size))
    assert tok.hf.convert_ids_to_tokens(ids) == layout.added_tokens()
    assert tok.hf.convert_tokens_to_ids([image_token(c) for c in range(K)]) == list(
        layout.codes_to_ids(torch.arange(K)).tolist()
    )
    assert len(tok) == len(tok.hf) == layout.vocab_size


def test_saved_folder_loads_with_auto_tokenizer(tok, saved):
    assert {"tokenizer.json", "tokenizer_config.json", LAYOUT_FILE} <= {
        p.name for p in saved.iterdir()
    }
    auto = AutoTokenizer.from_pretrained(str(saved))
    layout = tok.layout
    assert len(auto) == layout.vocab_size
    assert auto.eos_token_id == auto.pad_token_id == 50256
    codes = torch.arange(K)
    ids = layout.codes_to_ids(codes).tolist()
    assert auto.convert_ids_to_tokens(ids) == [image_token(c) for c in range(K)]
    from_auto = auto.convert_tokens_to_ids([image_token(c) for c in range(K)])
    assert from_auto == ids
    assert torch.equal(layout.ids_to_codes(torch.tensor(from_auto)), codes)
    # typed text stays text by default (GPT-2's own ids); control tokens only when asked for
    typed = "<|boi|><|img_00003|><|eoi|>"
    assert auto(typed)["input_ids"] == tok.encode_text(typed)
    assert auto("<|boi|>")["input_ids"] == [27, 91, 2127, 72, 91, 29]  # as GPT-2 encodes it
    assert auto(typed, split_special_tokens=False)["input_ids"] == [50257, 50259 + 3, 50258]
    assert tok.hf(typed)["input_ids"] == tok.encode_text(typed)  # vqgpt's own object too
    assert auto("Hello world")["input_ids"] == [15496, 995]


def test_from_pretrained_round_trip(tok, saved):
    again = JointTokenizer.from_pretrained(saved, codebook_size=K, grid=GRID)
    assert again.layout == tok.layout
    assert again.encode_texts(CORPUS) == tok.encode_texts(CORPUS)
    assert again.hf.convert_ids_to_tokens(tok.layout.vocab_size - 1) == image_token(K - 1)


def test_from_pretrained_mismatch_errors(saved, tmp_path):
    with pytest.raises(VocabMismatchError, match="codebook_size=64.*codebook_size=128"):
        JointTokenizer.from_pretrained(saved, codebook_size=128)
    with pytest.raises(VocabMismatchError, match="\\(8, 8\\)"):
        JointTokenizer.from_pretrained(saved, grid=(8, 8))
    with pytest.raises(ModelFolderError, match="tokenizer.json is missing"):
        JointTokenizer.from_pretrained(tmp_path)
    no_layout = tmp_path / "no_layout"
    shutil.copytree(saved, no_layout)
    (no_layout / LAYOUT_FILE).unlink()
    with pytest.raises(ModelFolderError, match=f"{LAYOUT_FILE} is missing"):
        JointTokenizer.from_pretrained(no_layout)
    (no_layout / LAYOUT_FILE).write_text('{"codebook_size": ')
    with pytest.raises(DamagedFileError, match=f"{LAYOUT_FILE}: not valid JSON"):
        JointTokenizer.from_pretrained(no_layout)
    # a layout file that disagrees with tokenizer.json is caught on load
    tampered = tmp_path / "tampered"
    shutil.copytree(saved, tampered)
    data = json.loads((tampered / LAYOUT_FILE).read_text())
    (tampered / LAYOUT_FILE).write_text(json.dumps({**data, "codebook_size": K + 1}))
    with pytest.raises(VocabMismatchError, match="disagree"):
        JointTokenizer.from_pretrained(tampered)


def test_build_on_saved_base_strips_added_tokens(tok, saved):
    """A tokenizer folder as base (here our own, with K image tokens) gives the same text ids."""
    other = JointTokenizer.build(8, (2, 2), base=str(saved))
    assert other.layout == VocabLayout(8, (2, 2))
    assert other.encode_texts(CORPUS) == tok.encode_texts(CORPUS)
    assert other.hf.convert_ids_to_tokens(other.layout.vocab_size - 1) == image_token(7)


def test_large_codebook_build_is_fast_and_exact():
    start = time.perf_counter()
    big = JointTokenizer.build(16384, (16, 16))
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"building K=16384 took {elapsed:.1f}s"
    layout = big.layout
    assert layout.vocab_size == 50259 + 16384
    assert big.hf.convert_tokens_to_ids("<|img_16383|>") == layout.vocab_size - 1
    assert big.hf("<|img_12345|>", split_special_tokens=False)["input_ids"] == [50259 + 12345]
    assert max(big.encode_text("<|img_16383|>")) < 50256


def test_a_document_vocabulary_has_doc_between_eoi_and_the_codes(tmp_path):
    """`documents=True` (an LM trained on documents): `<|doc|>` is 50259, the codes start at
    50260, and the saved folder keeps it (from_pretrained and AutoTokenizer)."""
    doc = JointTokenizer.build(K, GRID, documents=True)
    layout = doc.layout
    assert (layout.boi_id, layout.eoi_id, layout.doc_id) == (50257, 50258, 50259)
    assert layout.image_offset == 50260 and len(doc) == 50260 + K
    assert doc.hf.convert_ids_to_tokens(50259) == "<|doc|>"
    assert doc.encode_text("<|doc|>") == JointTokenizer.build(K, GRID).encode_text("<|doc|>")
    doc.save_pretrained(tmp_path)
    again = JointTokenizer.from_pretrained(tmp_path, codebook_size=K, grid=GRID)
    assert again.layout == layout
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.convert_tokens_to_ids(["<|doc|>", image_token(0)]) == [50259, 50260]
