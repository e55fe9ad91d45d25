"""Fixtures of the stage-two tests: references to hold the KV-cache loops against, and banks of
examples held in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from vqgpt.lm.batches import DocumentBank, ExampleBank
from vqgpt.lm.positions import ImagePositions, position_ids
from vqgpt.lm.vocab import VocabLayout


def _boost_logits(model: GPT2LMHeadModel, columns: torch.Tensor, value: float):
    """Add `value` to the logits of `columns` (bool [V]); returns the hook handle."""

    def hook(_module, _inputs, output):
        return output + value * columns.to(output.dtype)

    return model.lm_head.register_forward_hook(hook)


def _reference_greedy(model, prompt, allowed, steps, stop=None) -> list[int]:
    """Greedy decoding that reruns the whole sequence without a cache at every step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(token)
            if token == stop:
                break
            seq.append(token)
    return out


def _reference_document(
    model: GPT2LMHeadModel, layout: VocabLayout, prompt: list[int], steps: int
) -> list[int]:
    """Greedy document continuation recomputing the whole sequence at every step (no cache, no
    batch), with the model's position ids (`lm.positions`): text or boi, then h*w codes, eoi."""
    width = model.get_output_embeddings().weight.shape[0]
    text_ok = torch.zeros(width, dtype=torch.bool)
    text_ok[: layout.text_vocab_size] = True
    text_ok[layout.boi_id] = True
    image_ok = torch.zeros(width, dtype=torch.bool)
    image_ok[layout.image_offset : layout.vocab_size] = True
    hw, n_positions = layout.tokens_per_image, model.config.n_positions
    scheme = ImagePositions.of(model.config)
    seq, out, codes = list(prompt), [], None
    with torch.no_grad():
        while len(out) < steps:
            if codes == hw:
                token, codes = layout.eoi_id, None
            else:
                ids = torch.tensor([seq])
                mask = torch.ones_like(ids)  # with position ids, always a mask: lm.positions
                pos = position_ids(ids, mask, scheme)
                logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                allowed = text_ok if codes is None else image_ok
                token = int(logits[0, -1].masked_fill(~allowed, float("-inf")).argmax())
                if token == layout.boi_id:
                    if len(out) + hw + 2 > steps or len(seq) + hw + 2 > n_positions:
                        break
                    codes = 0
                elif codes is not None:
                    codes += 1
            out.append(token)
            seq.append(token)
            if token == layout.eos_id and codes is None:
                break
    return out


def _constrained_score(model, prompt, continuation, allowed) -> float:
    """sum(log p) / length of `continuation` after `prompt`, p renormalised over `allowed`."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(continuation)])).logits[0]
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    start = len(prompt) - 1  # logits at position i predict token i + 1
    picked = logp[start : start + len(continuation)].gather(1, torch.tensor(continuation)[:, None])
    return float(picked.sum()) / len(continuation)


def _image_prompt(layout: VocabLayout, codes: torch.Tensor) -> list[int]:
    """The captioning prompt `eos boi codes eoi` of one image's codes [h, w]."""
    return [layout.eos_id, layout.boi_id, *layout.codes_to_ids(codes).flatten().tolist()] + [
        layout.eoi_id
    ]


def _random_codes(layout: VocabLayout, n: int, seed: int = 1) -> torch.Tensor:
    """Seeded codes [n, h, w] in [0, K)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, layout.codebook_size, (n, *layout.grid), generator=generator)


@pytest.fixture(scope="session")
def boost_logits():
    """(model, columns, value) -> a forward hook adding `value` to those logits (remove it)."""
    return _boost_logits


@pytest.fixture(scope="session")
def reference_greedy():
    """(model, prompt, allowed, steps, stop=None) -> greedy ids, recomputed without a cache."""
    return _reference_greedy


@pytest.fixture(scope="session")
def reference_document():
    """(model, layout, prompt, steps) -> greedy document continuation, recomputed without a cache."""
    return _reference_document


@pytest.fixture(scope="session")
def constrained_score():
    """(model, prompt, continuation, allowed) -> mean constrained log-prob of the continuation."""
    return _constrained_score


@pytest.fixture(scope="session")
def image_prompt():
    """(layout, codes [h, w]) -> `eos boi codes eoi`."""
    return _image_prompt


@pytest.fixture(scope="session")
def random_codes():
    """(layout, n, seed=1) -> seeded codes [n, h, w]."""
    return _random_codes


class _IdsTokenizer:
    """A stand-in JointTokenizer for banks: a caption is its ids written out ("3 7 12")."""

    def __init__(self, layout: VocabLayout) -> None:
        self.layout = layout

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [[int(t) for t in text.split()] for text in texts]


def _memory_bank(
    codes: torch.Tensor, text_ids: list[list[int]], layout: VocabLayout
) -> ExampleBank:
    """An ExampleBank over an in-memory Arrow dataset of codes [n, h, w] and caption ids."""
    import datasets

    features = datasets.Features(
        {"codes": datasets.Array2D(layout.grid, "int16"), "text": datasets.Value("string")}
    )
    rows = {
        "codes": codes.to(torch.int16).numpy(),
        "text": [" ".join(map(str, ids)) for ids in text_ids],
    }
    dataset = datasets.Dataset.from_dict(rows, features=features)
    return ExampleBank(dataset, _IdsTokenizer(layout), Path("."))


@pytest.fixture(scope="session")
def memory_bank():
    """(codes [n, h, w], caption ids, layout) -> an ExampleBank held in memory."""
    return _memory_bank


def _memory_documents(documents: list[list], layout: VocabLayout) -> DocumentBank:
    """A DocumentBank over an in-memory Arrow dataset of documents, each a list of segments:
    text ids (a list) or codes [h, w]."""
    import numpy as np

    from vqgpt.lm.pretokenize_documents import EncodedDocuments, documents_dataset

    kinds, texts, codes = [], [], []
    for doc in documents:
        kinds.append([0 if isinstance(s, list) else 1 for s in doc])
        texts.append([" ".join(map(str, s)) for s in doc if isinstance(s, list)])
        grids = [
            torch.as_tensor(s).numpy().astype(np.int16) for s in doc if not isinstance(s, list)
        ]
        codes.append(np.stack(grids) if grids else np.zeros((0, *layout.grid), np.int16))
    encoded = EncodedDocuments(list(range(len(documents))), kinds, texts, codes, None)
    return DocumentBank(documents_dataset(encoded, layout.grid, "int16"), _IdsTokenizer(layout))


@pytest.fixture(scope="session")
def memory_documents():
    """(documents, layout) -> a DocumentBank held in memory (segments: text ids or codes)."""
    return _memory_documents
