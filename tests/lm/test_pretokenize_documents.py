"""Pretokenised documents: segments and codes round-trip, bad images both ways, re-runs do nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgpt.data.documents import DocumentsConfig
from vqgpt.data.images import ImageTransform, load_rgb
from vqgpt.data.shapes import ShapesConfig, shapes_dataset
from vqgpt.data.sources import DataConfig
from vqgpt.lm.batches import DocumentBank, joint_tokenizer
from vqgpt.lm.pretokenize import PretokenizeConfig, pretokenize, read_split_info
from vqgpt.lm.pretokenize_documents import documents_split_name, load_documents_segments
from vqgpt.lm.sequences import build_document
from vqgpt.tokenizer.codec import load_tokenizer_model

SHAPES = ShapesConfig(num_images=6, num_test_images=4, image_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """train.jsonl / test.jsonl beside imgs/: shapes images, one missing, one not an image."""
    root = tmp_path_factory.mktemp("docs")
    (root / "imgs").mkdir()
    for i, row in enumerate(shapes_dataset(SHAPES, "train")):
        row["image"].save(root / "imgs" / f"{i}.png")
    (root / "imgs" / "broken.png").write_bytes(b"not a png")
    train = [
        [
            {"text": "One red square."},
            {"image": "imgs/0.png"},
            {"text": " Then "},
            {"image": "imgs/1.png"},
        ],  # fmt: skip
        [{"image": "imgs/2.png"}, {"text": "a caption after"}],
        [{"text": "lost:"}, {"image": "imgs/missing.png"}, {"text": " end"}],
        [{"image": "imgs/broken.png"}],  # drop_image leaves nothing: left out either way
        [{"text": "text only"}],
        [{"image": "imgs/3.png"}, {"image": "imgs/4.png"}, {"image": "imgs/5.png"}],
    ]
    test = [[{"text": "held out "}, {"image": "imgs/5.png"}]]
    for name, docs in (("train", train), ("test", test)):
        lines = [json.dumps({"segments": d}) for d in docs]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(tokenizer: Path, corpus: Path, out: Path, **documents) -> PretokenizeConfig:
    images = DataConfig(source="shapes", image_size=32, shapes=SHAPES)
    return PretokenizeConfig(
        tokenizer=str(tokenizer),
        images=images,
        output_dir=str(out),
        batch_size=2,
        chunk_rows=4,  # two chunks of train documents
        documents=DocumentsConfig(source=str(corpus), **documents),
    )


def direct(model, corpus: Path, segments: list[dict]) -> list:
    """The reference: each text as is, each image encoded on its own."""
    transform = ImageTransform(model.config.arch.image_size)
    out = []
    for seg in segments:
        if "text" in seg:
            out.append(seg["text"])
        else:
            pixels = transform(load_rgb(Image.open(corpus / seg["image"])))[None]
            out.append(model.encode(pixels)[0].long())
    return out


def same_segments(got: list, want: list) -> bool:
    return len(got) == len(want) and all(
        (g == w) if isinstance(w, str) else torch.equal(g, w)
        for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("bad_images", ["skip", "drop_image"])
def test_documents_round_trip_and_bad_images(tiny_tokenizer_run, corpus, tmp_path, bad_images):
    cfg = config(tiny_tokenizer_run, corpus, tmp_path / "codes", bad_images=bad_images)
    result = pretokenize(cfg)
    assert list(result.splits) == ["train", "test", "documents-train", "documents-test"]
    docs = result.splits["documents-train"]
    assert docs.chunks == 2 and not docs.already_done
    assert docs.skipped.counts == {"missing": 1, "not_an_image": 1}

    model = load_tokenizer_model(tiny_tokenizer_run)
    lines = [json.loads(x)["segments"] for x in (corpus / "train.jsonl").read_text().splitlines()]
    if bad_images == "skip":
        want = [lines[i] for i in (0, 1, 4, 5)]
    else:  # document 2 without its image; document 3 had nothing else
        want = [lines[0], lines[1], [lines[2][0], lines[2][2]], lines[4], lines[5]]
    stored = load_documents_segments(cfg.output_dir, "train")
    assert len(stored) == docs.rows == len(want)
    for got, segments in zip(stored, want, strict=True):
        assert same_segments(got, direct(model, corpus, segments))
    info = read_split_info(cfg.output_dir, documents_split_name("train"))
    assert info.source_rows == 6 and info.rows == len(want)

    # the bank gives the same documents, texts as BPE ids; built, they are build_document's
    tokenizer = joint_tokenizer(cfg)
    bank = DocumentBank.load(cfg, "train", tokenizer)
    for got, segments in zip(bank.read(range(len(bank))), stored, strict=True):
        ids = build_document(got, tokenizer.layout, None).input_ids
        assert ids == build_document(segments, tokenizer.layout, tokenizer).input_ids

    again = pretokenize(cfg)  # the same identity: nothing to do
    assert not again.did_work and again.splits["documents-train"].rows == docs.rows


def test_a_changed_policy_redoes_only_the_documents(tiny_tokenizer_run, corpus, tmp_path):
    out = tmp_path / "codes"
    pretokenize(config(tiny_tokenizer_run, corpus, out))
    result = pretokenize(config(tiny_tokenizer_run, corpus, out, bad_images="drop_image"))
    done = {name: r.already_done for name, r in result.splits.items()}
    assert done == {"train": True, "test": True, "documents-train": False, "documents-test": False}
