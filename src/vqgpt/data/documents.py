"""Interleaved documents in: JSON Lines files, or a registered builder (`shapes_stories`).

A document is an ordered list of segments, each exactly one of a text or an image:

    {"segments": [{"text": "A red square."}, {"image": "imgs/0001.png"}, {"text": "Then ..."}]}

one document per line; an image path is relative to the JSONL file's folder (or absolute).

In memory every source gives a `datasets.Dataset` with a `segments` column of
`document_features()`: a list of {"text": str | None, "image": image | None} structs, exactly one
of the two set, in order. An image is what `vqgpt.data.images.read_image` takes: a path, a
{bytes, path} dict or a PIL image (the `Image()` feature stores paths as {bytes: None, path}).
Nothing is opened here: a missing or unreadable image is found, counted and handled
(`DocumentsConfig.bad_images`) when the documents are pretokenized.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqgpt.config import ConfigError
from vqgpt.data.sources import DataError

STORIES_SOURCE = "shapes_stories"  # built by vqgpt.data.stories.stories_dataset
BAD_IMAGES = (
    "skip",
    "drop_image",
)  # a document with an unreadable image: left out | kept without it
SEGMENT_KEYS = ("text", "image")


@dataclass
class DocumentsConfig:
    """Where interleaved documents come from (`data.documents` of an LM recipe)."""

    # a .jsonl file (`{split}` in it: the split's name), a folder of <split>.jsonl files, or
    # "shapes_stories"; a plain file serves every split
    source: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    num_documents: int | None = None  # cap on the documents of each split
    bad_images: str = "skip"  # skip: leave the document out | drop_image: keep it without the image
    stories: dict[str, Any] | None = None  # source shapes_stories: the StoriesConfig fields

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError(
                "data.documents.source must name a .jsonl file, a folder of <split>.jsonl files "
                f"or {STORIES_SOURCE!r}"
            )
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(
                f"data.documents.bad_images={self.bad_images!r} is not one of {', '.join(BAD_IMAGES)}"
            )
        if self.num_documents is not None and self.num_documents < 1:
            raise ConfigError("data.documents.num_documents must be at least 1 or null (no cap)")
        if not self.train_split or not self.eval_split:
            raise ConfigError("data.documents.train_split and eval_split must be non-empty")
        if self.stories is not None and self.source != STORIES_SOURCE:
            raise ConfigError(
                f"data.documents.stories is read only with source {STORIES_SOURCE!r}, "
                f"not {self.source!r}"
            )

    @property
    def splits(self) -> list[str]:
        """The splits to pretokenize: train and eval (once when they are the same)."""
        return list(dict.fromkeys([self.train_split, self.eval_split]))


def document_features():  # -> datasets.Features
    """The in-memory contract of every document source: a `segments` column, a list of
    {"text": string, "image": Image()} structs (one of the two set, the other None)."""
    import datasets

    segment = {"text": datasets.Value("string"), "image": datasets.Image()}
    return datasets.Features({"segments": datasets.List(segment)})


def _segment(value: Any, folder: Path, where: str) -> dict[str, Any]:
    """One JSONL segment checked: {"text": str} or {"image": path} (made absolute)."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in SEGMENT_KEYS:
        raise DataError(
            f'{where}: a segment must be {{"text": "..."}} or {{"image": "path"}}, got '
            f"{json.dumps(value)[:80]}"
        )
    ((key, item),) = value.items()
    if not isinstance(item, str) or (key == "image" and not item):
        raise DataError(f"{where}: the {key} of a segment must be a non-empty string")
    if key == "text":
        return {"text": item, "image": None}
    # stored as the Image feature stores a path (an absolute path stays itself)
    return {"text": None, "image": {"bytes": None, "path": str(folder / item)}}


def parse_document_line(line: str, where: str, folder: Path) -> list[dict[str, Any]]:
    """One JSON Lines document `{"segments": [{"text": ...}, {"image": path}, ...]}` -> its
    segments as `document_features()` stores them (image paths made absolute from `folder`).

    Raises:
        DataError: not JSON, not a document, or a bad segment (`where` names file:line).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not a JSON line ({err})") from None
    segments = record.get("segments") if isinstance(record, dict) else None
    if not isinstance(segments, list) or not segments:
        raise DataError(
            f'{where}: a document must be {{"segments": [...]}} with at least one segment'
        )
    return [_segment(s, folder, f"{where} segment {i}") for i, s in enumerate(segments)]


def read_documents(path: str | Path, limit: int | None = None):  # -> datasets.Dataset
    """The documents of a JSON Lines file (the first `limit`), as `document_features()`.

    Raises:
        FileNotFoundError: no such file.
        DataError: a line that is not a document, naming file:line and what was wrong.
    """
    import datasets

    path = Path(path)
    folder = path.resolve().parent
    documents = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if limit is not None and len(documents) >= limit:
                break
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not a JSON line ({err})") from None
            if line.strip():
                documents.append({"segments": parse_document_line(line, where, folder)})
    if not documents:
        raise DataError(f"{path}: no documents in it")
    return datasets.Dataset.from_list(documents, features=document_features())


def documents_path(source: str, split: str) -> Path:
    """The JSONL file of `split`: `{split}` filled in, <folder>/<split>.jsonl, or the file."""
    if "{split}" in source:
        return Path(source.replace("{split}", split))
    path = Path(source)
    return path / f"{split}.jsonl" if path.is_dir() else path


def load_documents(cfg: DocumentsConfig, split: str):  # -> datasets.Dataset
    """`split` of the configured documents: a `segments` column (`document_features()`), and
    whatever else the source gives (shapes_stories: the `story` ground truth).

    Raises:
        DataError: the source is missing or unreadable (one line, naming file:line).
    """
    from vqgpt.config import from_dict

    if cfg.source == STORIES_SOURCE:
        try:  # by name: the builder lives in vqgpt.data.stories, added separately
            stories_module = importlib.import_module("vqgpt.data.stories")
        except ImportError as err:
            raise DataError(
                f"data.documents.source={STORIES_SOURCE!r} needs vqgpt.data.stories, which this "
                f"installation lacks ({err})"
            ) from None
        stories = from_dict(
            stories_module.StoriesConfig, dict(cfg.stories or {}), "data.documents.stories"
        )
        ds = stories_module.stories_dataset(stories, split)
        if cfg.num_documents is not None and cfg.num_documents < len(ds):
            ds = ds.select(range(cfg.num_documents))
        return ds
    path = documents_path(cfg.source, split)
    if not path.is_file():
        raise DataError(
            f"data.documents.source: no file {path} for split {split!r} (a .jsonl file, "
            "`{split}` in its path, or a folder of <split>.jsonl files)"
        )
    return read_documents(path, cfg.num_documents)


def describe_documents(cfg: DocumentsConfig, split: str) -> dict[str, Any]:
    """The settings that decide a split's pretokenized documents (a JSONL file by its size and
    modification time; the images it names are not fingerprinted)."""
    desc: dict[str, Any] = {
        "documents": cfg.source,
        "split": split,
        "num_documents": cfg.num_documents,
        "bad_images": cfg.bad_images,
    }
    if cfg.source == STORIES_SOURCE:
        desc["stories"] = cfg.stories or {}
        from vqgpt.data.stories import STORIES_VERSION  # stories -> shapes; light to import

        desc["stories_version"] = STORIES_VERSION  # cached stories are redone when it changes
    else:
        path = documents_path(cfg.source, split)
        if path.is_file():
            st = path.stat()
            desc["documents"] = str(path.resolve())
            key = f"{st.st_size}\0{st.st_mtime_ns}".encode()
            desc["file"] = hashlib.sha256(key).hexdigest()
    return desc


__all__ = [
    "BAD_IMAGES",
    "STORIES_SOURCE",
    "DocumentsConfig",
    "describe_documents",
    "document_features",
    "documents_path",
    "load_documents",
    "read_documents",
]
