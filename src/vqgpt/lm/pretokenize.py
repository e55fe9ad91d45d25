"""Pretokenisation: every image of a dataset split -> its code grid, encoded once, cached on disk.

Output, per split, at `<output_dir>/<split>/`: a `datasets` Arrow dataset (`save_to_disk`) with

    codes   Array2D (h, w), int16 (int32 when K > 32768); Array3D (h, w, L) for residual VQ.
            The grid lives in the feature's shape: `ds.features["codes"].shape == (h, w)`, and
            `codes_tensor(ds[i:j])` (or `ds.with_format("torch")`) gives [N, h, w].
    text    the caption
    ...     every other column of the source except `image` (e.g. the shapes `objects`)

in the source's row order; unreadable or missing images are skipped and counted. The folder also
holds `vqgpt_pretokenize.json` (`SplitInfo`): the tokenizer's fingerprint (sha256 of config.json
and its safetensors), the source description, rows and skips. It is written last, so its presence
means the split is complete; a re-run with the same tokenizer and source does no work.

Several processes (`accelerate launch`): rank r encodes the contiguous rows [r*n/W, (r+1)*n/W) and
saves them to `<split>.shards/rank<r>/`; rank 0 concatenates the shards in rank order into
`<split>.tmp/` and renames it to `<split>/`. Multi-node runs need output_dir on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from vqgpt.config import ConfigError, to_dict
from vqgpt.data.images import ImageTransform, read_image
from vqgpt.data.sources import DataConfig, DataError, SkipStats, load_image_dataset
from vqgpt.distributed import process_state
from vqgpt.files import read_json, read_text, write_text
from vqgpt.tokenizer.codec import load_tokenizer_model, resolve_model_dir
from vqgpt.tokenizer.vqvae import VQVAE

MARKER = "vqgpt_pretokenize.json"
FORMAT_VERSION = 1
SCRATCH = (".tmp", ".shards")  # suffixes of the working folders beside a split


@dataclass
class PretokenizeConfig:
    """Which tokenizer encodes which dataset splits, and where the codes go."""

    tokenizer: str = "runs/tokenizer"  # a stage-one run folder or its final/ folder
    images: DataConfig = field(default_factory=DataConfig)  # the dataset to encode
    output_dir: str = "runs/codes"  # one Arrow dataset per split: <output_dir>/<split>/
    splits: list[str] | None = None  # None: [images.train_split, images.eval_split]
    batch_size: int = 64  # images per encoder call (per process)

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError("tokenizer must name a trained tokenizer (run or final/ folder)")
        if not self.output_dir:
            raise ConfigError("output_dir must name a folder for the codes")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
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
class SplitInfo:
    """What `vqgpt_pretokenize.json` records about a finished split."""

    split: str
    rows: int  # rows written
    skipped: SkipStats  # images left out, per reason
    grid: list[int]  # codes shape of one image: [h, w] or [h, w, L]
    codebook_size: int
    tokenizer: str  # the path it was given (for people; the fingerprint decides)
    tokenizer_fingerprint: str
    source: dict[str, Any]  # `describe_source`
    version: int = FORMAT_VERSION

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


def read_split_info(output_dir: str | Path, split: str) -> SplitInfo | None:
    """The record of a finished split; None when the split is missing or unfinished."""
    path = Path(output_dir) / split / MARKER
    if not path.is_file():
        return None
    try:
        return SplitInfo.from_json(read_text(path))
    except (ValueError, TypeError, KeyError):  # an older or damaged record: treat as unfinished
        return None


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
def encode_rows(
    model: VQVAE, ds, rows: range, batch_size: int, progress: str | None = None
) -> EncodedRows:
    """Encode the images of `rows` of `ds` in batches; undecodable images are skipped, counted.

    `progress` is the description of a tqdm bar over the rows; None shows none.
    """
    import datasets

    images = ds.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))
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

    with tqdm(total=len(rows), desc=progress, disable=progress is None, unit="img") as bar:
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            for i, value in zip(range(start, stop), images[start:stop]["image"], strict=True):
                image, skip = read_image(value)
                if image is None:
                    name = value.get("path") if isinstance(value, dict) else None
                    stats.add_skip(skip, str(name or f"row {i}"))
                    continue
                kept.append(i)
                pending.append(transform(image))
                if len(pending) == batch_size:
                    flush()
            bar.update(stop - start)
    if pending:
        flush()
    empty = np.zeros((0, *_codes_feature(model).shape), dtype=dtype)
    return EncodedRows(kept, np.concatenate(codes) if codes else empty, stats)


def _shard_dataset(ds, encoded: EncodedRows, model: VQVAE):
    """codes + every source column but `image`, for the encoded rows."""
    import datasets

    codes = datasets.Dataset.from_dict(
        {"codes": encoded.codes}, features=datasets.Features(codes=_codes_feature(model))
    )
    rest = ds.remove_columns("image").select(encoded.rows)
    return datasets.concatenate_datasets([codes, rest], axis=1)


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


def _pretokenize_split(
    state: PartialState,
    model: VQVAE,
    cfg: PretokenizeConfig,
    images: DataConfig,
    split: str,
    fingerprint: str,
) -> SplitResult:
    import datasets

    out = Path(cfg.output_dir)
    final, tmp, shards = out / split, out / f"{split}.tmp", out / f"{split}.shards"
    source = describe_source(images, split)
    done = read_split_info(out, split)
    if (
        done is not None
        and done.version == FORMAT_VERSION
        and done.tokenizer_fingerprint == fingerprint
        and done.source == source
    ):
        _note(state, f"{split}: already pretokenized in {final} ({done.rows} rows), nothing to do")
        _check_rows(done)
        return SplitResult(split, final, done.rows, done.skipped, already_done=True)

    # Every rank loads the split (folder sources count missing / unreadable files here, the same
    # on every rank) and encodes its contiguous slice of the rows.
    load_stats = SkipStats()
    ds = load_image_dataset(images, split, load_stats)
    rank, world = state.process_index, state.num_processes
    rows = range(len(ds) * rank // world, len(ds) * (rank + 1) // world)
    bar = f"pretokenize {split}" if state.is_main_process else None
    encoded = encode_rows(model, ds, rows, cfg.batch_size, progress=bar)
    shard = shards / f"rank{rank:05d}"
    shutil.rmtree(shard, ignore_errors=True)
    shards.mkdir(parents=True, exist_ok=True)
    _shard_dataset(ds, encoded, model).save_to_disk(str(shard))
    write_text(shards / f"rank{rank:05d}.json", json.dumps(asdict(encoded.stats)))
    state.wait_for_everyone()

    if state.is_main_process:
        parts = [datasets.load_from_disk(str(shards / f"rank{r:05d}")) for r in range(world)]
        skipped = load_stats
        for r in range(world):
            skipped.merge(SkipStats(**read_json(shards / f"rank{r:05d}.json")))
        merged = datasets.concatenate_datasets(parts)
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_to_disk(str(tmp))
        info = SplitInfo(
            split=split,
            rows=len(merged),
            skipped=skipped,
            grid=list(_codes_feature(model).shape),
            codebook_size=model.codebook_size,
            tokenizer=str(cfg.tokenizer),
            tokenizer_fingerprint=fingerprint,
            source=source,
        )
        write_text(tmp / MARKER, info.to_json())  # last: its presence means complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(shards, ignore_errors=True)
        if skipped.total:
            _note(state, f"{split}: {skipped}")
    state.wait_for_everyone()
    info = read_split_info(out, split)
    if info is None:
        raise DataError(f"{final}: rank 0 did not finish writing the split")
    _check_rows(info)
    return SplitResult(split, final, info.rows, info.skipped, already_done=False)


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
    return PretokenizeResult(results)


# ---------------------------------------------------------------------------------------------
# reading


def load_codes(output_dir: str | Path, split: str):  # -> datasets.Dataset
    """The pretokenized `split` (columns codes, text, ...) as a datasets.Dataset."""
    import datasets

    if read_split_info(output_dir, split) is None:
        raise FileNotFoundError(
            f"{Path(output_dir) / split}: no finished pretokenized split here; "
            "run `vqgpt pretokenize --config LM_RECIPE` first"
        )
    return datasets.load_from_disk(str(Path(output_dir) / split))


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
    "MARKER",
    "EncodedRows",
    "PretokenizeConfig",
    "PretokenizeResult",
    "SplitInfo",
    "SplitResult",
    "codes_dtype",
    "codes_tensor",
    "describe_source",
    "encode_rows",
    "load_codes",
    "pretokenize",
    "read_split_info",
    "tokenizer_fingerprint",
]
