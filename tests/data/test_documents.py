"""Interleaved documents in: the JSON Lines reader, its errors, the config, the segments contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vqgpt.config import ConfigError, from_dict
from vqgpt.data.documents import (
    DocumentsConfig,
    describe_documents,
    document_features,
    load_documents,
    read_documents,
)
from vqgpt.data.images import read_image
from vqgpt.data.sources import DataError


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "a.png")
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"segments": [{"text": "A red square."}, {"image": "imgs/a.png"}, {"text": " Done."}]},
            "",  # blank lines are skipped
            {"segments": [{"image": "imgs/missing.png"}], "id": 7},  # other keys are ignored
        ],
    )
    write_jsonl(tmp_path / "test.jsonl", [{"segments": [{"text": "held out"}]}])
    return tmp_path


def test_jsonl_documents_keep_segment_order_and_resolve_paths(docs_dir):
    ds = read_documents(docs_dir / "train.jsonl")
    assert ds.features == document_features()
    assert len(ds) == 2
    first = ds.cast(undecoded())[0]["segments"]
    assert [s["text"] for s in first] == ["A red square.", None, " Done."]
    assert first[1]["image"]["path"] == str((docs_dir / "imgs" / "a.png").resolve())
    image, _ = read_image(first[1]["image"])
    assert image.size == (8, 8)
    missing = ds.cast(undecoded())[1]["segments"][0]["image"]
    image, skip = read_image(missing)  # kept here; pretokenisation counts it (reason missing)
    assert image is None and skip.reason == "missing"


def undecoded():
    import datasets

    segment = {"text": datasets.Value("string"), "image": datasets.Image(decode=False)}
    return datasets.Features({"segments": datasets.List(segment)})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not a JSON line"),
        ("[1, 2]", 'a document must be {"segments": [...]}'),
        ('{"segments": []}', "at least one segment"),
        ('{"segments": [{"text": "a", "image": "b.png"}]}', "segment 0: a segment must be"),
        ('{"segments": [{"text": "a"}, {"caption": "b"}]}', "segment 1: a segment must be"),
        ('{"segments": [{"image": 3}]}', "segment 0: the image of a segment must be"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"segments": [{"text": "fine"}]}, line])
    with pytest.raises(DataError) as err:
        read_documents(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2") and message in text and "\n" not in text


def test_splits_from_a_folder_a_pattern_or_one_file(docs_dir):
    folder = DocumentsConfig(source=str(docs_dir))
    assert len(load_documents(folder, "train")) == 2 and len(load_documents(folder, "test")) == 1
    pattern = DocumentsConfig(source=str(docs_dir / "{split}.jsonl"), num_documents=1)
    assert len(load_documents(pattern, "train")) == 1
    one = DocumentsConfig(source=str(docs_dir / "test.jsonl"))
    assert len(load_documents(one, "train")) == len(load_documents(one, "test")) == 1
    with pytest.raises(DataError, match="no file .*nope.jsonl for split 'nope'"):
        load_documents(folder, "nope")
    # the identity of a split follows its file
    before = describe_documents(folder, "train")
    write_jsonl(docs_dir / "train.jsonl", [{"segments": [{"text": "changed, longer file"}]}])
    assert describe_documents(folder, "train") != before


def test_config_checks_its_fields():
    cfg = from_dict(DocumentsConfig, {"source": "d.jsonl", "bad_images": "drop_image"})
    assert cfg.splits == ["train", "test"]
    for bad, message in [
        ({}, "data.documents.source must name"),
        ({"source": "d.jsonl", "bad_images": "keep"}, "bad_images='keep' is not one of"),
        ({"source": "d.jsonl", "num_documents": 0}, "num_documents must be at least 1"),
        ({"source": "d.jsonl", "stories": {}}, "stories is read only with source"),
        ({"source": "d.jsonl", "colour": 1}, "unknown config key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(DocumentsConfig, bad)


def test_stories_source_without_its_builder_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vqgpt.data.stories", None)  # not installed
    with pytest.raises(DataError, match="needs vqgpt.data.stories"):
        load_documents(DocumentsConfig(source="shapes_stories"), "train")
