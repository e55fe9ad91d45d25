"""Files in: which data files `data.source` names, in which format, read through `datasets`.

`data.source` may be a folder, a file, a glob (`shards/*.tar`) or brace notation
(`shards/{00000..00099}.tar`, expanded by the `braceexpand` package), or several of these
(`a/{x,y}/*.parquet`); the files are sorted after expansion, so rows come in a deterministic
order. The format is `data.format`, else the files' suffix (`.parquet`, `.arrow`, `.tar`), else
what a folder holds (metadata.jsonl / metadata.csv or image files: an image folder; else its
.parquet, .arrow or .tar files). A folder with a `<split>/` subfolder gives that split.

Each format ends as the contract of `vqgpt.data.sources.load_image_dataset`: an `image` column
whose values `read_image` accepts (never decoded here: HF `Image` features are cast to
`Image(decode=False)`, so a bad image is counted where it is read, never raised), a `text`
column (str, "" when there is none) and every other column of the source unchanged.

WebDataset shards (img2dataset's `00000.tar`: `key.jpg` with `key.txt` and/or `key.json`) are
read by datasets' `webdataset` builder. What that builder does on its own (datasets 5.2):
it infers the features from the first 5 examples of the first shard and raises ValueError
("... don't share the same prefix or the same types") when their members differ, so one key
without a caption or without an image among them stops the whole load; a member kind not in
the features is dropped silently, and a missing one is None. It decodes `.txt` (UTF-8) and
`.json` members itself: a `.json` that is not JSON, or a `.txt` that is not UTF-8, raises
inside the builder and stops the load (we turn that into a DataError naming the shards; in a
stream it stops the stream there). Image members stay bytes until accessed. So vqgpt passes
the features itself (jpg, jpeg, png, webp, txt always; `json` when the first shard has JSON
members, its fields inferred from the first objects: fields first seen later are dropped): then a key with no image member has
image None (read_image counts it as missing), a zero-byte, corrupt or non-image member is
counted by read_image (empty / truncated / not an image), and a key with no caption keeps its
image with text "". The caption is the `.txt` member, else the JSON field `data.caption_key`.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

from vqgpt.data.sources import FORMATS, DataError, undecoded

SUFFIX_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
# the image members of a WebDataset sample, in the order one is taken when a key has several
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
WDS_JSON_SAMPLES = 32  # JSON members read to infer the json column's fields


class DataFiles(NamedTuple):
    """What `data.source` names: a format and its files (sorted), or a folder for "folder"."""

    format: str  # folder | parquet | arrow | webdataset
    files: list[str]


def _matches(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern] if os.path.exists(pattern) else []


def find_data_files(source: str, fmt: str, split: str) -> DataFiles | None:
    """The local files `source` names (None when it names nothing local: a Hub name).

    `{split}` in `source` is the split's name (`shards/{split}-{0000..0099}.tar`: each split its
    own shards); without it every split reads the same files, unless a folder has `<split>/`.

    DataError: a pattern that matches nothing, a folder with nothing to read, files of mixed or
    unknown suffixes (set data.format), a .tar that is not a tar archive.
    """
    from braceexpand import braceexpand

    patterns = [os.path.expanduser(p) for p in braceexpand(source.replace("{split}", split))]
    found: list[str] = []
    for pattern in patterns:
        matched = _matches(pattern)
        if not matched:
            wild = len(patterns) > 1 or any(c in pattern for c in "*?[")
            if wild:
                raise DataError(f"data.source={source!r}: {pattern} matches no file")
            return None
        found += matched
    files = sorted(dict.fromkeys(found))
    if len(files) == 1 and os.path.isdir(files[0]):
        result = _folder_files(Path(files[0]), fmt, split, source)
    else:
        folders = [f for f in files if os.path.isdir(f)]
        if folders:
            raise DataError(
                f"data.source={source!r} names the folder {folders[0]} among files; name "
                "one folder, or files only"
            )
        result = DataFiles(_format_of(files, fmt, source), files)
    if result.format == "webdataset":
        for f in result.files:
            if not tarfile.is_tarfile(f):
                raise DataError(f"{f} is not a tar archive (data.source={source!r})")
    return result


def _format_of(files: list[str], fmt: str, source: str) -> str:
    if fmt != "auto":
        return fmt
    kinds = {SUFFIX_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        odd = next(f for f in files if Path(f).suffix.lower() not in SUFFIX_FORMATS)
        raise DataError(
            f"data.source={source!r}: cannot tell the format of {odd} from its suffix; "
            f"set data.format to one of {', '.join(FORMATS[1:-1])}"
        )
    if len(kinds) > 1:
        raise DataError(
            f"data.source={source!r} mixes {' and '.join(sorted(kinds))} files; name one format"
        )
    return kinds.pop()


def _folder_files(root: Path, fmt: str, split: str, source: str) -> DataFiles:
    if (root / split).is_dir():
        root = root / split
    if fmt == "folder" or (
        fmt == "auto" and any((root / m).is_file() for m in ("metadata.jsonl", "metadata.csv"))
    ):
        return DataFiles("folder", [str(root)])
    by_format: dict[str, list[str]] = {}
    for suffix, kind in SUFFIX_FORMATS.items():
        if fmt in ("auto", kind):
            files = sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file())
            if files:
                by_format[kind] = files
    if len(by_format) == 1:
        kind, files = by_format.popitem()
        return DataFiles(kind, files)
    if len(by_format) > 1:
        raise DataError(
            f"data.source={source!r}: {root} holds {' and '.join(sorted(by_format))} files; "
            "set data.format"
        )
    if fmt in ("auto", "folder"):
        return DataFiles("folder", [str(root)])  # an image folder (its errors say what is there)
    raise DataError(f"data.source={source!r}: {root} holds no {fmt} files")


# ---------------------------------------------------------------------------------------------
# Parquet and Arrow


def table_dataset(files: DataFiles, cfg: Any):  # -> datasets.Dataset | IterableDataset
    """Parquet or Arrow files through `datasets.load_dataset(format, data_files=...)`, with
    cfg.image_column / cfg.text_column renamed; a path column is read relative to the folder of
    the first file."""
    ds = _load(files, cfg.streaming)
    base = Path(files.files[0]).resolve().parent
    return standardize_columns(ds, cfg.image_column, cfg.text_column, base, where=files.files[0])


def _load(files: DataFiles, streaming: bool, features=None):
    import datasets

    try:
        return datasets.load_dataset(
            files.format,
            data_files={"train": files.files},
            split="train",
            streaming=streaming,
            features=features,
        )
    except Exception as err:  # the builder's own errors (bad JSON member, damaged file, ...)
        shown = files.files[0] + (f" (and {len(files.files) - 1} more)" if files.files[1:] else "")
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"{shown}: datasets could not read it as {files.format} ({type(err).__name__}: "
            f"{detail})"
        ) from err


def standardize_columns(
    ds, image_column: str, text_column: str, base: Path | None = None, where=""
):
    """Rename image_column -> image, text_column -> text ("" text when text_column is "" or a
    value is null), keep every other column, leave images undecoded; relative path strings in
    the image column are taken relative to `base`."""
    import datasets

    names = list(ds.column_names or [])
    missing = [c for c in (image_column, text_column) if c and c not in names]
    if missing:
        raise DataError(
            f"{where + ': ' if where else ''}column(s) {missing} not in the dataset; it has "
            f"{names}. Set data.image_column / data.text_column (text_column: '' for no captions)."
        )
    renames = {k: v for k, v in ((image_column, "image"), (text_column, "text")) if k and k != v}
    clash = [v for k, v in renames.items() if v in names]
    if clash:
        raise DataError(
            f"{where + ': ' if where else ''}the dataset already has a column {clash[0]!r} "
            f"besides data.{clash[0]}_column's; its columns: {names}"
        )
    # undecoded before anything else: a rename of a stream decodes and re-encodes its images
    feature = ds.features[image_column] if ds.features else None
    ds = undecoded(ds, image_column)
    if renames:
        ds = ds.rename_columns(renames)
    relative = base is not None and feature == datasets.Value("string")

    def fix(row: dict[str, Any]) -> dict[str, Any]:
        out = {"text": row.get("text") or ""}
        if relative and isinstance(row["image"], str):
            out["image"] = str(base / row["image"])  # an absolute path stays as it is
        return out

    if isinstance(ds, datasets.IterableDataset):
        features = ds.features.copy() if ds.features else None
        if features is not None:
            features["text"] = datasets.Value("string")
        return ds.map(fix, features=features)
    texts = ds["text"] if "text" in ds.column_names else [None] * len(ds)
    if "text" not in ds.column_names or any(t is None for t in texts):
        ds = _replace_column(ds, "text", [t or "" for t in texts])
    if relative:
        ds = _replace_column(ds, "image", [p if p is None else str(base / p) for p in ds["image"]])
    return ds


def _replace_column(ds, name: str, values: list):
    """A small column (texts, paths) replaced without rewriting the others (no copy of images)."""
    position = ds.column_names.index(name) if name in ds.column_names else len(ds.column_names)
    if name in ds.column_names:
        ds = ds.remove_columns(name)
    ds = ds.add_column(name, values)
    order = list(ds.column_names)
    order.insert(position, order.pop())
    return ds.select_columns(order)


# ---------------------------------------------------------------------------------------------
# WebDataset


class ShardFields(NamedTuple):
    """The member kinds of a WebDataset shard."""

    images: list[str]  # image suffixes found (jpg, png, ...), in WDS_IMAGE_SUFFIXES order
    json: list[dict]  # the first JSON objects (to infer the json column's fields)


def shard_fields(path: str) -> ShardFields:
    """The image suffixes and the first JSON objects of a shard."""
    import json

    suffixes: set[str] = set()
    objects: list[dict] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or "." not in os.path.basename(member.name):
                continue
            suffix = os.path.basename(member.name).split(".", 1)[1].lower()
            suffixes.add(suffix)
            if suffix == "json" and len(objects) < WDS_JSON_SAMPLES:
                try:
                    value = json.loads(tar.extractfile(member).read())
                except ValueError:
                    continue
                if isinstance(value, dict):
                    objects.append(value)
    images = [s for s in WDS_IMAGE_SUFFIXES if s in suffixes]
    return ShardFields(images, objects)


def _wds_features(fields: ShardFields):
    import datasets
    import pyarrow as pa

    # every image suffix and txt, found in the first shard or not: a later shard may hold them
    features = {s: datasets.Image(decode=False) for s in WDS_IMAGE_SUFFIXES}
    features["txt"] = datasets.Value("string")
    if fields.json:
        schema = pa.Table.from_pylist(fields.json).schema  # the union of their fields
        features["json"] = datasets.Features.from_arrow_schema(schema)
    features["__key__"] = datasets.Value("string")
    features["__url__"] = datasets.Value("string")
    return datasets.Features(features)


def webdataset_dataset(files: DataFiles, cfg: Any):  # -> datasets.Dataset | IterableDataset
    """WebDataset tar shards: `image` = the first image member of each key (None when it has
    none), `text` = its .txt member, else the JSON field cfg.caption_key, else ""; the .json
    member (a struct column `json`), `__key__` and `__url__` are kept."""
    import datasets

    fields = shard_fields(files.files[0])
    if not fields.images:
        raise DataError(
            f"{files.files[0]}: no image member ({', '.join(WDS_IMAGE_SUFFIXES)}) in this "
            "WebDataset shard"
        )
    features = _wds_features(fields)
    ds = _load(files, cfg.streaming, features)
    key = cfg.caption_key

    def caption(txt: str | None, meta: Any) -> str:
        if txt:
            return txt
        value = meta.get(key) if isinstance(meta, dict) and key else None
        return value if isinstance(value, str) else ""

    drop = [*WDS_IMAGE_SUFFIXES, "txt"]
    out_features = datasets.Features(
        image=datasets.Image(decode=False),
        text=datasets.Value("string"),
        **{k: v for k, v in features.items() if k not in drop},
    )

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        image = next((row[s] for s in WDS_IMAGE_SUFFIXES if row[s] is not None), None)
        return {"image": image, "text": caption(row.get("txt"), row.get("json"))}

    if isinstance(ds, datasets.IterableDataset):
        return ds.map(convert, remove_columns=drop, features=out_features)
    present = [s for s in WDS_IMAGE_SUFFIXES if ds.data.column(s).null_count < len(ds)]
    if len(present) <= 1:
        # not streamed: only the small columns are computed; the images are renamed, not copied
        small = ds.select_columns([c for c in ("txt", "json") if c in ds.column_names])
        texts = [caption(r.get("txt"), r.get("json")) for r in small]
        keep = present[0] if present else WDS_IMAGE_SUFFIXES[0]
        ds = ds.rename_column(keep, "image").remove_columns([c for c in drop if c != keep])
        ds = ds.add_column("text", texts)
    else:  # several image suffixes: one column made row by row (a copy on disk)
        ds = ds.map(convert, remove_columns=drop, features=out_features)
    return ds.select_columns(list(out_features))
