"""Pretokenised interleaved documents: every image of every document encoded once, cached on disk.

Output, per split of `data.documents`, at `<output_dir>/documents-<split>/`: chunk-NNNNN/ folders
and an index, made, resumed and shared over processes exactly as image splits are
(`vqgpt.lm.pretokenize`; a chunk is `chunk_rows` source documents). One row per document kept:

    kinds   List(int8): the kind of each segment, in order (0 text, 1 image)
    texts   List(string): the text segments, in order
    codes   Array3D (None, h, w) int16 (int32 when K > 32768): the image segments' codes, in order
    ...     every other column of the source except `segments` (shapes_stories: `story`)

so segment i is `texts[#text kinds before i]` or `codes[#image kinds before i]` (`segments_of`).
Unreadable or missing images are counted per reason in the split's skips; a document with one is
left out (`bad_images: skip`) or kept without that image (`drop_image`); a document left with no
segment is left out. The index's `source_rows - rows` is the number of documents left out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState

from vqgpt.data.documents import describe_documents, load_documents
from vqgpt.data.sources import DataError, SkipStats
from vqgpt.lm import pretokenize as pretokenize_module
from vqgpt.lm.pretokenize import (
    PretokenizeConfig,
    Progress,
    SplitResult,
    SplitWork,
    already_done,
    codes_dtype,
    concat_columns,
    encode_images,
    finish_split,
    split_identity,
    start_split,
)
from vqgpt.tokenizer.vqvae import VQVAE

TEXT, IMAGE = 0, 1  # `kinds` values
PREFIX = "documents-"


def documents_split_name(split: str) -> str:
    """The folder of a documents split under output_dir: documents-train."""
    return f"{PREFIX}{split}"


class EncodedDocuments(NamedTuple):
    """Some documents, their images encoded (`encode_documents`)."""

    rows: list[int]  # source rows kept, ascending
    kinds: list[list[int]]  # per document kept: TEXT / IMAGE per segment
    texts: list[list[str]]
    codes: list[np.ndarray]  # per document kept: (images, h, w)
    stats: SkipStats  # images that did not decode, per reason


def documents_features(grid: Sequence[int], dtype: str):  # -> datasets.Features
    """The columns of a pretokenized documents split for codes of `grid` (h, w) and `dtype`."""
    import datasets

    if len(grid) != 2:
        raise ValueError(f"documents take one code per position: grid (h, w), got {tuple(grid)}")
    return datasets.Features(
        {
            "kinds": datasets.List(datasets.Value("int8")),
            "texts": datasets.List(datasets.Value("string")),
            "codes": datasets.Array3D((None, *grid), dtype),
        }
    )


def documents_dataset(encoded: EncodedDocuments, grid: Sequence[int], dtype: str):
    """`encoded` as a `datasets.Dataset` of `documents_features` (tests build banks with it)."""
    import datasets

    data = {"kinds": encoded.kinds, "texts": encoded.texts, "codes": encoded.codes}
    return datasets.Dataset.from_dict(data, features=documents_features(grid, dtype))


def encode_documents(
    model: VQVAE,
    documents: Sequence[Sequence[dict[str, Any]]],
    first_row: int,
    batch_size: int,
    bad_images: str,
    progress: Progress | None = None,
) -> EncodedDocuments:
    """Encode the images of `documents` (rows first_row, first_row + 1, ...; each a list of
    {"text", "image"} segments) in batches; bad images handled by `bad_images`.

    Raises:
        DataError: a segment with neither or both of text and image.
    """
    values = []
    for d, segments in enumerate(documents):
        for s, seg in enumerate(segments):
            has_text, has_image = seg.get("text") is not None, seg.get("image") is not None
            if has_text == has_image:
                raise DataError(
                    f"document {first_row + d} segment {s}: a segment holds exactly one of "
                    f"text and image, got {sorted(k for k, v in seg.items() if v is not None)}"
                )
            if has_image:
                values.append((len(values), seg["image"]))
    encoded = encode_images(model, values, batch_size, progress)
    by_image = dict(zip(encoded.rows, encoded.codes, strict=True))
    out = EncodedDocuments([], [], [], [], encoded.stats)
    empty = np.zeros((0, *model.grid), dtype=codes_dtype(model.codebook_size))
    image = 0
    for d, segments in enumerate(documents):
        kinds, texts, codes, bad = [], [], [], False
        for seg in segments:
            if seg.get("image") is None:
                kinds.append(TEXT)
                texts.append(seg["text"])
                continue
            grid = by_image.get(image)
            image += 1
            if grid is None:
                bad = True
            else:
                kinds.append(IMAGE)
                codes.append(grid)
        if kinds and not (bad and bad_images == "skip"):
            out.rows.append(first_row + d)
            out.kinds.append(kinds)
            out.texts.append(texts)
            out.codes.append(np.stack(codes) if codes else empty)
    return out


def _undecoded_segments(ds):
    """`ds` with the images of its `segments` left as bytes / paths (read_image decodes them)."""
    import datasets

    feature = ds.features["segments"]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, dict) and isinstance(inner.get("image"), datasets.Image):
        segment = {**inner, "image": datasets.Image(decode=False)}
        return ds.cast_column("segments", datasets.List(segment))
    return ds


def pretokenize_documents(
    state: PartialState, model: VQVAE, cfg: PretokenizeConfig, split: str, fingerprint: str
) -> SplitResult:
    """Encode the images of `split` of `cfg.documents` into <output_dir>/documents-<split>/."""
    docs = cfg.documents
    assert docs is not None
    split_dir = Path(cfg.output_dir) / documents_split_name(split)
    identity = split_identity(fingerprint, describe_documents(docs, split), cfg.chunk_rows)
    done = already_done(state, split_dir, identity)
    if done is not None:
        return done

    began = time.perf_counter()
    ds = load_documents(docs, split)
    if "segments" not in ds.column_names:
        raise DataError(f"documents {docs.source!r} split {split!r}: no `segments` column")
    kept = start_split(state, split_dir, identity)
    segments = _undecoded_segments(ds.select_columns(["segments"]))
    rest = ds.remove_columns("segments")
    dtype = str(codes_dtype(model.codebook_size))
    n, r = len(ds), cfg.chunk_rows
    rank, world = state.process_index, state.num_processes
    todo = [c for c in range(-(-n // r)) if c % world == rank and c not in kept]
    with Progress(None, f"pretokenize {split_dir.name}", state.is_main_process) as progress:
        for c in todo:
            rows = range(c * r, min(n, (c + 1) * r))
            chunk = segments[rows.start : rows.stop]["segments"]
            encoded = encode_documents(
                model, chunk, rows.start, cfg.batch_size, docs.bad_images, progress
            )
            data = concat_columns(
                documents_dataset(encoded, model.grid, dtype), rest.select(encoded.rows)
            )
            # through the module: a test may wrap write_chunk (a pause between chunks)
            pretokenize_module.write_chunk(split_dir, c, rows, data, encoded.stats, identity)
    state.wait_for_everyone()
    work = SplitWork(n, kept, SkipStats(), began, "documents")
    return finish_split(state, cfg, model, split_dir, identity, fingerprint, work)


def segments_of(kinds: Sequence[int], texts: Sequence[Any], codes: Sequence[Any]) -> list[Any]:
    """A stored document's segments in order: its texts and codes interleaved by `kinds`."""
    if len(texts) != sum(k == TEXT for k in kinds) or len(codes) != len(kinds) - len(texts):
        raise ValueError(
            f"a stored document's kinds {list(kinds)} do not match its {len(texts)} texts and "
            f"{len(codes)} images"
        )
    text, image = iter(texts), iter(codes)
    return [next(text) if k == TEXT else next(image) for k in kinds]


def load_documents_segments(output_dir: str | Path, split: str) -> list[list[str | torch.Tensor]]:
    """Every document of a pretokenized split as its segments (text, codes [h, w]): for tests
    and inspection (training reads rows through `vqgpt.lm.batches.DocumentBank`)."""
    from vqgpt.lm.pretokenize import load_codes

    ds = load_codes(output_dir, documents_split_name(split)).with_format("numpy")
    out = []
    for row in ds:
        codes = [torch.as_tensor(c).long() for c in row["codes"]]
        out.append(segments_of(row["kinds"].tolist(), [str(t) for t in row["texts"]], codes))
    return out


__all__ = [
    "IMAGE",
    "TEXT",
    "EncodedDocuments",
    "documents_dataset",
    "documents_features",
    "documents_split_name",
    "encode_documents",
    "load_documents_segments",
    "pretokenize_documents",
    "segments_of",
]
