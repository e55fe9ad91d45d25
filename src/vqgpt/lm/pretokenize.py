"""Pretokenisation: every image of a dataset split -> its code grid, encoded once, cached on disk.

Output, per split, at `<output_dir>/<split>/`:

    chunk-00000/            a `datasets` Arrow dataset (`save_to_disk`) of source rows [0, R)
        data-*.arrow, dataset_info.json, state.json
        vqgpt_chunk.json    `ChunkInfo`: source rows [start, stop), rows kept, skips, identity
    chunk-00001/            source rows [R, 2R) ... (R = chunk_rows)
    vqgpt_pretokenize.json  `SplitInfo`: the index (chunks in order, rows, skips); written last

Each chunk dataset has the columns

    codes   Array2D (h, w), int16 (int32 when K > 32768); Array3D (h, w, L) for residual VQ.
            The grid lives in the feature's shape: `ds.features["codes"].shape == (h, w)`, and
            `codes_tensor(ds[i:j])` (or `ds.with_format("torch")`) gives [N, h, w].
    text    the caption
    ...     every other column of the source except `image` (e.g. the shapes `objects`)

in the source's row order; unreadable or missing images are skipped and counted. `load_codes`
concatenates the chunks in order (memory-mapped). Identity: the tokenizer's fingerprint (sha256 of
config.json and its safetensors), the source description, chunk_rows and FORMAT_VERSION.

Resuming: a chunk is written to `chunk-NNNNN.tmp/` (its record last) and renamed, so a finished
chunk is whole. A run keeps every chunk whose record matches its identity and encodes the others;
the index is written only when every chunk is there, so its presence means the split is complete
and a re-run with the same identity does no work. Anything else in the split folder (a leftover
`.tmp`, a chunk of another tokenizer or source, an older layout) is deleted first.

Interleaved documents (`PretokenizeConfig.documents`) go to `<output_dir>/documents-<split>/` in
the same chunks + index layout, with their own columns (`vqgpt.lm.pretokenize_documents`).

Several processes (`accelerate launch`, several nodes with output_dir on a shared filesystem):
chunk c belongs to rank c % world, so any world size resumes any other's work. The input is a
map-style `datasets.Dataset` (a chunk's rows are read directly) or a `datasets.IterableDataset`
(every rank walks the stream and decodes only its own unfinished chunks' images).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from vqgpt.config import ConfigError, to_dict
from vqgpt.data.documents import DocumentsConfig
from vqgpt.data.images import ImageTransform, describe_skips, read_image
from vqgpt.data.sources import DataConfig, DataError, SkipStats, load_image_dataset, undecoded
from vqgpt.distributed import process_state
from vqgpt.files import read_json, read_text, write_text
from vqgpt.tokenizer.codec import load_tokenizer_model, resolve_model_dir
from vqgpt.tokenizer.vqvae import VQVAE

MARKER = "vqgpt_pretokenize.json"  # the split's index; present = complete
CHUNK_RECORD = "vqgpt_chunk.json"  # inside each chunk folder
FORMAT_VERSION = 2  # 2: chunk-NNNNN/ folders and an index (1: one Arrow dataset per split)
SCRATCH = (".tmp", ".shards")  # suffixes of working folders (a split may not end with one)


def chunk_name(chunk: int) -> str:
    """The folder of chunk `chunk` under its split: chunk-00003."""
    return f"chunk-{chunk:05d}"


@dataclass
class PretokenizeConfig:
    """Which tokenizer encodes which dataset splits, and where the codes go."""

    tokenizer: str = "runs/tokenizer"  # a stage-one run folder or its final/ folder
    images: DataConfig = field(default_factory=DataConfig)  # the dataset to encode
    output_dir: str = "runs/codes"  # per split: <output_dir>/<split>/chunk-NNNNN/ + an index
    splits: list[str] | None = None  # None: [images.train_split, images.eval_split]
    batch_size: int = 64  # images per encoder call (per process)
    chunk_rows: int = 10_000  # source rows per chunk: the unit of resuming and of sharing work
    # interleaved documents, pretokenized per split into <output_dir>/documents-<split>/
    documents: DocumentsConfig | None = None

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError("tokenizer must name a trained tokenizer (run or final/ folder)")
        if not self.output_dir:
            raise ConfigError("output_dir must name a folder for the codes")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows={self.chunk_rows} must be at least 1")
        if self.splits is None:
            self.splits = list(dict.fromkeys([self.images.train_split, self.images.eval_split]))
        if not self.splits:
            raise ConfigError("splits must name at least one split")
        for split in self.splits:
            if not split or "/" in split or split in (".", "..") or split.endswith(SCRATCH):
                raise ConfigError(f"splits: {split!r} cannot be a folder name under output_dir")
        if len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"splits {self.splits} names a split twice")


@dataclass
class Identity:
    """What a chunk or a split was made from: all must match for it to be kept."""

    tokenizer_fingerprint: str
    source: dict[str, Any]  # `describe_source`
    chunk_rows: int
    version: int = FORMAT_VERSION


@dataclass
class ChunkInfo:
    """`chunk-NNNNN/vqgpt_chunk.json`: one finished chunk."""

    chunk: int
    start: int  # source rows [start, stop)
    stop: int
    rows: int  # rows written (source rows less skipped images)
    skipped: SkipStats
    identity: Identity

    def to_json(self) -> str:
        """This record as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChunkInfo:
        """Inverse of `to_json`."""
        data = json.loads(text)
        data["skipped"] = SkipStats(**data["skipped"])
        data["identity"] = Identity(**data["identity"])
        return cls(**data)


@dataclass
class SplitInfo:
    """What `vqgpt_pretokenize.json` records about a finished split: its index."""

    split: str
    rows: int  # rows written, all chunks
    skipped: SkipStats  # images left out, per reason (loading + every chunk)
    grid: list[int]  # codes shape of one image: [h, w] or [h, w, L]
    codebook_size: int
    tokenizer: str  # the path it was given (for people; the fingerprint decides)
    tokenizer_fingerprint: str
    source: dict[str, Any]  # `describe_source`
    chunk_rows: int
    source_rows: int  # rows of the source split (the chunks cover [0, source_rows))
    chunks: list[str]  # chunk folder names, in row order
    chunk_rows_kept: list[int]  # rows written per chunk
    version: int = FORMAT_VERSION

    @property
    def identity(self) -> Identity:
        return Identity(self.tokenizer_fingerprint, self.source, self.chunk_rows, self.version)

    def to_json(self) -> str:
        """This record as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SplitInfo:
        """Inverse of `to_json`."""
        data = json.loads(text)
        data["skipped"] = SkipStats(**data["skipped"])
        return cls(**data)


@dataclass
class SplitResult:
    """One split of a `pretokenize` call."""

    split: str
    path: Path
    rows: int
    skipped: SkipStats
    already_done: bool  # True: a finished output matched, nothing was encoded
    chunks: int = 0  # chunks of the split
    chunks_encoded: int = 0  # chunks encoded by this call (all processes); the rest were kept


@dataclass
class PretokenizeResult:
    """Every split of a `pretokenize` call, in the order of the config."""

    splits: dict[str, SplitResult]

    @property
    def did_work(self) -> bool:
        """Whether any split was (re)computed."""
        return any(not r.already_done for r in self.splits.values())

    def summary(self) -> str:
        """One line per split."""
        lines = []
        for r in self.splits.values():
            state = "already done, nothing to do" if r.already_done else "written"
            line = f"{r.split}: {r.rows} rows in {r.path} ({state})"
            if r.skipped.total:
                line += f"; {r.skipped}"
            lines.append(line)
        return "\n".join(lines)


class EncodedRows(NamedTuple):
    rows: list[int]  # source row indices that were encoded, ascending
    codes: np.ndarray  # (len(rows), h, w) or (len(rows), h, w, L)
    stats: SkipStats  # rows whose image did not decode


# ---------------------------------------------------------------------------------------------
# identities: what a finished split was made from


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 of a tokenizer folder's config.json and *.safetensors weights."""
    folder = resolve_model_dir(path)
    digest = hashlib.sha256()
    for file in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path, size and mtime: a changed folder is a new source."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def describe_source(images: DataConfig, split: str) -> dict[str, Any]:
    """The settings that decide a split's rows (a Hub dataset is known by name only)."""
    desc: dict[str, Any] = {
        "source": images.source,
        "split": split,
        "num_images": images.num_images,
        "image_column": images.image_column,
        "text_column": images.text_column,
    }
    if images.source == "shapes":
        desc["shapes"] = to_dict(images.shapes)
    elif images.source == "photos":
        desc["photos"] = to_dict(images.photos)
        desc["image_size"] = images.image_size
    elif Path(images.source).is_dir():
        folder = Path(images.source).resolve()
        desc["source"] = str(folder)
        desc["files"] = _folder_fingerprint(folder)
    return desc


def _read_record(path: Path, cls):
    """A ChunkInfo / SplitInfo from `path`; None when missing, older or damaged."""
    if not path.is_file():
        return None
    try:
        return cls.from_json(read_text(path))
    except (ValueError, TypeError, KeyError, AttributeError):  # an older or damaged record
        return None


def read_split_info(output_dir: str | Path, split: str) -> SplitInfo | None:
    """The index of a finished split; None when the split is missing, unfinished or older."""
    info = _read_record(Path(output_dir) / split / MARKER, SplitInfo)
    return info if info is not None and info.version == FORMAT_VERSION else None


def read_chunk_info(split_dir: str | Path, chunk: int) -> ChunkInfo | None:
    """The record of a finished chunk of the split in `split_dir`; None when there is none."""
    return _read_record(Path(split_dir) / chunk_name(chunk) / CHUNK_RECORD, ChunkInfo)


# ---------------------------------------------------------------------------------------------
# encoding


def codes_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type that holds codes 0..codebook_size-1 (int16 or int32)."""
    return np.dtype(np.int16 if codebook_size <= 2**15 else np.int32)


def _codes_feature(model: VQVAE):
    import datasets

    dtype = str(codes_dtype(model.codebook_size))
    h, w = model.grid
    num_quantizers = model.config.quant.num_quantizers
    if num_quantizers > 1:
        return datasets.Array3D((h, w, num_quantizers), dtype)
    return datasets.Array2D((h, w), dtype)


@torch.no_grad()
def encode_images(
    model: VQVAE,
    values: Iterable[tuple[int, Any]],
    batch_size: int,
    progress: Progress | None = None,
) -> EncodedRows:
    """Encode (row, image value) pairs in batches; undecodable images are skipped, counted.

    An image value is what `read_image` takes (a path, bytes, a {bytes, path} dict, a PIL image).
    `progress`, when given, advances by one per row and counts the skips.
    """
    transform = ImageTransform(model.config.arch.image_size, random_crop=False)
    dtype = codes_dtype(model.codebook_size)
    kept: list[int] = []
    codes: list[np.ndarray] = []
    stats = SkipStats()
    pending: list[torch.Tensor] = []

    def flush() -> None:
        pixels = torch.stack(pending).to(model.device)  # (B, 3, H, W)
        codes.append(model.encode(pixels).cpu().numpy().astype(dtype))  # (B, h, w[, L])
        pending.clear()

    for i, value in values:
        image, skip = read_image(value)
        if image is None:
            name = value.get("path") if isinstance(value, dict) else None
            stats.add_skip(skip, str(name or f"row {i}"))
        else:
            kept.append(i)
            pending.append(transform(image))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress.row(skipped=image is None)
    if pending:
        flush()
    empty = np.zeros((0, *_codes_feature(model).shape), dtype=dtype)
    return EncodedRows(kept, np.concatenate(codes) if codes else empty, stats)


def _column_values(ds, rows: range, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(row, image value) of `rows` of a map-style dataset, read a batch at a time."""
    images = undecoded(ds.select_columns(["image"]))
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        yield from zip(range(start, stop), images[start:stop]["image"], strict=True)


def encode_rows(
    model: VQVAE, ds, rows: range, batch_size: int, progress: str | None = None
) -> EncodedRows:
    """Encode the images of `rows` of a map-style `ds` in batches; undecodable ones are skipped.

    `progress` is the description of a tqdm bar over the rows; None shows none.
    """
    with Progress(len(rows), progress, progress is not None) as bar:
        return encode_images(model, _column_values(ds, rows, batch_size), batch_size, bar)


class Progress:
    """A tqdm bar over images (its rate: images/s) whose postfix counts the skipped ones."""

    def __init__(self, total: int | None, desc: str | None, show: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, disable=not show, unit="img", dynamic_ncols=True)
        self.skipped = 0

    def row(self, skipped: bool) -> None:
        """One image read (and encoded, unless `skipped`)."""
        self.bar.update(1)
        if skipped:
            self.skipped += 1
            self.bar.set_postfix(skipped=self.skipped, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# chunks: which rows, from a map-style dataset or a stream


class Chunk(NamedTuple):
    """The rows [index * chunk_rows, ...) of the source that one process encodes."""

    index: int
    start: int  # first source row
    values: Iterator[tuple[int, Any]]  # (source row, image value), read as consumed
    rest: Any  # (kept source rows) -> datasets.Dataset of every column but `image`


class ChunkPlan:
    """The chunks `todo(c)` accepts, in order; `source_rows` once every row was passed over."""

    def __init__(self, ds, chunk_rows: int, todo, batch_size: int) -> None:
        import datasets

        self.ds, self.chunk_rows, self.todo, self.batch_size = ds, chunk_rows, todo, batch_size
        self.streamed = isinstance(ds, datasets.IterableDataset)
        self.source_rows: int | None = None if self.streamed else len(ds)

    def rows_to_encode(self) -> int | None:
        """Source rows of the accepted chunks (None for a stream: its length is unknown)."""
        if self.source_rows is None:
            return None
        n, r = self.source_rows, self.chunk_rows
        return sum(min(n, (c + 1) * r) - c * r for c in range(-(-n // r)) if self.todo(c))

    def __iter__(self) -> Iterator[Chunk]:
        return self._stream() if self.streamed else self._map()

    def _map(self) -> Iterator[Chunk]:
        rest = self.ds.remove_columns("image")
        n, r = len(self.ds), self.chunk_rows
        for c in range(-(-n // r)):
            if self.todo(c):
                rows = range(c * r, min(n, (c + 1) * r))
                values = _column_values(self.ds, rows, self.batch_size)
                yield Chunk(c, rows.start, values, rest.select)

    def _stream(self) -> Iterator[Chunk]:
        import datasets

        ds = self.ds if self.ds.features is not None else self.ds._resolve_features()
        ds = undecoded(ds)
        features = datasets.Features({k: v for k, v in ds.features.items() if k != "image"})
        seen = 0

        def numbered() -> Iterator[tuple[int, dict]]:
            nonlocal seen
            for i, row in enumerate(ds):
                seen = i + 1
                yield i, row

        # groupby passes over the rows of a chunk it is not asked for without decoding them
        for c, group in itertools.groupby(numbered(), key=lambda item: item[0] // self.chunk_rows):
            if not self.todo(c):
                continue
            others: dict[int, dict] = {}  # the chunk's other columns, by source row

            def rest(kept: list[int], others=others):
                return datasets.Dataset.from_list([others[i] for i in kept], features=features)

            yield Chunk(c, c * self.chunk_rows, _image_values(group, others), rest)
        self.source_rows = seen


def _image_values(rows: Iterable[tuple[int, dict]], others: dict[int, dict]):
    """(row, image value) of streamed rows; their other columns go to `others[row]`."""
    for i, row in rows:
        others[i] = {k: v for k, v in row.items() if k != "image"}
        yield i, row["image"]


def _chunk_number(name: str) -> int | None:
    """3 for "chunk-00003"; None for any other name."""
    prefix, _, digits = name.partition("-")
    return int(digits) if prefix == "chunk" and digits.isdigit() else None


def _finished_chunks(split_dir: Path, identity: Identity) -> set[int]:
    """The chunks in `split_dir` whose record matches `identity`."""
    if not split_dir.is_dir():
        return set()
    found = set()
    for entry in split_dir.iterdir():
        c = _chunk_number(entry.name)
        info = read_chunk_info(split_dir, c) if c is not None else None
        if info is not None and info.chunk == c and info.identity == identity:
            found.add(c)
    return found


def _clear_split(split_dir: Path, identity: Identity) -> None:
    """Delete the index first, then everything but the chunks made with `identity`."""
    (split_dir / MARKER).unlink(missing_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    keep = {chunk_name(c) for c in _finished_chunks(split_dir, identity)}
    for entry in split_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _codes_dataset(codes: np.ndarray, model: VQVAE):  # -> datasets.Dataset
    import datasets

    return datasets.Dataset.from_dict(
        {"codes": codes}, features=datasets.Features(codes=_codes_feature(model))
    )


def write_chunk(
    split_dir: Path,
    chunk: int,
    rows: range,
    data,  # datasets.Dataset: the chunk's rows
    skipped: SkipStats,
    identity: Identity,
) -> ChunkInfo:
    """Save one chunk's rows (source `rows`) to chunk-NNNNN.tmp/, its record last, and rename it
    into place."""
    final = split_dir / chunk_name(chunk)
    tmp = split_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    info = ChunkInfo(chunk, rows.start, rows.stop, len(data), skipped, identity)
    write_text(tmp / CHUNK_RECORD, info.to_json())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return info


# ---------------------------------------------------------------------------------------------
# the job


def _note(state: PartialState, text: str) -> None:
    """A message on stderr, from the main process only."""
    if state.is_main_process:
        print(text, file=sys.stderr)


def _check_rows(info: SplitInfo) -> None:
    """A split none of whose images could be read is an error, not an empty success."""
    if info.rows == 0:
        raise DataError(f"split {info.split!r}: no image could be read ({info.skipped})")


def split_identity(fingerprint: str, source: dict[str, Any], chunk_rows: int) -> Identity:
    """The identity as its JSON record reads back (tuples become lists), for comparisons."""
    return Identity(**json.loads(json.dumps(asdict(Identity(fingerprint, source, chunk_rows)))))


def _describe_skips(stats: SkipStats) -> str:
    return f"{stats.total} skipped ({describe_skips(stats.counts)})" if stats.total else "0 skipped"


def identity_change(old: Identity, new: Identity) -> str:
    """What differs between two identities, in words ("another tokenizer and source")."""
    parts = [
        name
        for name, differs in (
            ("tokenizer", old.tokenizer_fingerprint != new.tokenizer_fingerprint),
            ("source", old.source != new.source),
            ("chunk size", old.chunk_rows != new.chunk_rows),
            ("format version", old.version != new.version),
        )
        if differs
    ]
    return "another " + " and ".join(parts or ["identity"])


def already_done(state: PartialState, split_dir: Path, identity: Identity) -> SplitResult | None:
    """The result of a finished split made with `identity`; None when it must be (re)done."""
    done = read_split_info(split_dir.parent, split_dir.name)
    if done is None:
        return None
    if done.identity != identity:
        _note(
            state,
            f"{split_dir.name}: {split_dir} holds codes of {identity_change(done.identity, identity)}"
            " than this run's: they are replaced by codes encoded again",
        )
        return None
    _note(
        state,
        f"{split_dir.name}: already pretokenized in {split_dir} ({done.rows} rows), nothing to do",
    )
    _check_rows(done)
    return SplitResult(
        split_dir.name, split_dir, done.rows, done.skipped, True, chunks=len(done.chunks)
    )


def start_split(state: PartialState, split_dir: Path, identity: Identity) -> set[int]:
    """Rank 0 clears what cannot be kept before any rank writes; the chunks kept."""
    if state.is_main_process:
        _clear_split(split_dir, identity)
    state.wait_for_everyone()
    return _finished_chunks(split_dir, identity)


class SplitWork(NamedTuple):
    """What one call did to a split, for its index (`finish_split`)."""

    source_rows: int  # rows of the source split
    kept: set[int]  # chunks kept from an earlier run
    load_stats: SkipStats  # skips counted while loading the source
    began: float  # time.perf_counter() at the start
    unit: str  # what a row is ("images", "documents"), for the summary line


def finish_split(
    state: PartialState,
    cfg: PretokenizeConfig,
    model: VQVAE,
    split_dir: Path,
    identity: Identity,
    fingerprint: str,
    work: SplitWork,
) -> SplitResult:
    """Check every chunk is there, write the split's index (rank 0, last) and say so."""
    split = split_dir.name
    num_chunks = -(-work.source_rows // cfg.chunk_rows)
    chunks = [read_chunk_info(split_dir, c) for c in range(num_chunks)]
    missing = [c for c, info in enumerate(chunks) if info is None or info.identity != identity]
    if missing:
        raise DataError(
            f"{split_dir}: chunk(s) {missing[:10]} of {num_chunks} were not written (a process "
            "failed?); run pretokenize again to finish them"
        )
    skipped = work.load_stats
    for info in chunks:
        skipped.merge(info.skipped)
    info = SplitInfo(
        split=split,
        rows=sum(c.rows for c in chunks),
        skipped=skipped,
        grid=list(_codes_feature(model).shape),
        codebook_size=model.codebook_size,
        tokenizer=str(cfg.tokenizer),
        tokenizer_fingerprint=fingerprint,
        source=identity.source,
        chunk_rows=cfg.chunk_rows,
        source_rows=work.source_rows,
        chunks=[chunk_name(c.chunk) for c in chunks],
        chunk_rows_kept=[c.rows for c in chunks],
    )
    if state.is_main_process:  # the index, last: its presence means the split is complete
        tmp = split_dir / f"{MARKER}.tmp"
        write_text(tmp, info.to_json())
        os.replace(tmp, split_dir / MARKER)
    encoded_now = [c for c in chunks if c.chunk not in work.kept]
    rate = sum(c.stop - c.start for c in encoded_now) / max(time.perf_counter() - work.began, 1e-9)
    left_out = work.source_rows - info.rows
    _note(
        state,
        f"pretokenize {split}: {info.rows} rows, {num_chunks} chunks ({len(encoded_now)} encoded, "
        f"{num_chunks - len(encoded_now)} kept), {_describe_skips(skipped)}, "
        + (f"{left_out} {work.unit} left out, " if work.unit != "images" else "")
        + f"{rate:.1f} {work.unit}/s",
    )
    state.wait_for_everyone()
    if read_split_info(split_dir.parent, split) is None:
        raise DataError(f"{split_dir}: rank 0 did not finish writing the split's index")
    _check_rows(info)
    return SplitResult(
        split, split_dir, info.rows, skipped, False, num_chunks, chunks_encoded=len(encoded_now)
    )


def _pretokenize_split(
    state: PartialState,
    model: VQVAE,
    cfg: PretokenizeConfig,
    images: DataConfig,
    split: str,
    fingerprint: str,
) -> SplitResult:
    split_dir = Path(cfg.output_dir) / split
    identity = split_identity(fingerprint, describe_source(images, split), cfg.chunk_rows)
    done = already_done(state, split_dir, identity)
    if done is not None:
        return done

    began = time.perf_counter()
    # Every rank loads the split (folder sources count missing / unreadable files here, the same
    # on every rank); rank 0 clears what cannot be kept before any rank writes.
    load_stats = SkipStats()
    ds = load_image_dataset(images, split, load_stats)
    kept = start_split(state, split_dir, identity)
    rank, world = state.process_index, state.num_processes
    plan = ChunkPlan(
        ds, cfg.chunk_rows, lambda c: c % world == rank and c not in kept, cfg.batch_size
    )
    show = state.is_main_process
    with Progress(plan.rows_to_encode(), f"pretokenize {split}", show) as progress:
        for chunk in plan:
            encoded = encode_images(model, chunk.values, cfg.batch_size, progress)
            data = concat_columns(_codes_dataset(encoded.codes, model), chunk.rest(encoded.rows))
            stop = chunk.start + len(encoded.rows) + encoded.stats.total  # kept or skipped
            write_chunk(
                split_dir, chunk.index, range(chunk.start, stop), data, encoded.stats, identity
            )
    state.wait_for_everyone()

    assert plan.source_rows is not None  # known once the plan was walked
    work = SplitWork(plan.source_rows, kept, load_stats, began, "images")
    return finish_split(state, cfg, model, split_dir, identity, fingerprint, work)


def concat_columns(left, right):  # -> datasets.Dataset
    """The columns of `left` then those of `right` (same rows); `right` may have no columns."""
    import datasets

    if not right.column_names:
        return left
    return datasets.concatenate_datasets([left, right], axis=1)


def pretokenize(cfg: PretokenizeConfig) -> PretokenizeResult:
    """Encode each split's images with the tokenizer into <output_dir>/<split>/ (once)."""
    state = process_state()
    fingerprint = tokenizer_fingerprint(cfg.tokenizer)
    model = load_tokenizer_model(cfg.tokenizer, device=state.device)
    # one source of truth for the image size, as in stage-one training: the tokenizer
    images = replace(cfg.images, image_size=model.config.arch.image_size)
    assert cfg.splits is not None  # filled in by __post_init__
    results = {
        split: _pretokenize_split(state, model, cfg, images, split, fingerprint)
        for split in cfg.splits
    }
    if cfg.documents is not None:
        from vqgpt.lm.pretokenize_documents import documents_split_name, pretokenize_documents

        for split in cfg.documents.splits:
            results[documents_split_name(split)] = pretokenize_documents(
                state, model, cfg, split, fingerprint
            )
    return PretokenizeResult(results)


# ---------------------------------------------------------------------------------------------
# reading


def load_codes(output_dir: str | Path, split: str):  # -> datasets.Dataset
    """The pretokenized `split` (columns codes, text, ...): its chunks in order, memory-mapped."""
    import datasets

    info = read_split_info(output_dir, split)
    if info is None:
        raise FileNotFoundError(
            f"{Path(output_dir) / split}: no finished pretokenized split here; "
            "run `vqgpt pretokenize --config LM_RECIPE` first"
        )
    folder = Path(output_dir) / split
    parts = [datasets.load_from_disk(str(folder / name)) for name in info.chunks]
    return datasets.concatenate_datasets(parts)


def codes_files(output_dir: str | Path, split: str) -> list[Path]:
    """The Arrow files of a finished split, in row order (its chunks' `save_to_disk` files), for
    readers that open them without `datasets` (`vqgpt.lm.arrow_rows.ArrowRows`).

    Raises:
        FileNotFoundError: the split is missing or unfinished.
    """
    info = read_split_info(output_dir, split)
    if info is None:
        raise FileNotFoundError(
            f"{Path(output_dir) / split}: no finished pretokenized split here; "
            "run `vqgpt pretokenize --config LM_RECIPE` first"
        )
    files = []
    for name in info.chunks:
        chunk = Path(output_dir) / split / name
        state = read_json(chunk / "state.json")  # datasets' record of the folder's files
        files += [chunk / f["filename"] for f in state["_data_files"]]
    return files


def codes_tensor(row_or_batch: Mapping[str, Any] | Any) -> torch.Tensor:
    """A row's or a batch's `codes` (lists, arrays or tensors) as a LongTensor [..., h, w]."""
    value = row_or_batch["codes"] if isinstance(row_or_batch, Mapping) else row_or_batch
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        value = torch.stack(list(value))
    codes = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if codes.ndim < 2:
        raise ValueError(f"codes must have at least 2 dims [h, w], got shape {tuple(codes.shape)}")
    return codes.long()


__all__ = [
    "CHUNK_RECORD",
    "MARKER",
    "ChunkInfo",
    "EncodedRows",
    "Identity",
    "PretokenizeConfig",
    "PretokenizeResult",
    "Progress",
    "SplitInfo",
    "SplitResult",
    "SplitWork",
    "already_done",
    "concat_columns",
    "finish_split",
    "split_identity",
    "start_split",
    "write_chunk",
    "chunk_name",
    "codes_dtype",
    "codes_files",
    "codes_tensor",
    "describe_source",
    "encode_images",
    "encode_rows",
    "load_codes",
    "pretokenize",
    "read_chunk_info",
    "read_split_info",
    "tokenizer_fingerprint",
]
