"""What each kind of model folder must hold, checked before anything loads from it.

One manifest per folder kind (the image tokenizer, the GPT-2, the joint vocabulary, the pipeline
that holds all three), and the checks every loader runs first: the folder exists and is a folder;
every required file is there, is a file and can be read; JSON files parse to an object (a
truncated or empty `config.json` is named); `config.json` has the expected `model_type`; a
safetensors file's header is whole and its size matches the tensors the header lists (a
truncated or garbage weights file is named as damaged). A run folder resolves to its `final/`;
a run still training (no `final/` yet) and a training checkpoint are told apart from a model.

Errors are `ModelFolderError` (missing, not a folder, a checkpoint) and `DamagedFileError`
(present but unreadable); both are `VqgptError`s, which the CLI prints as one line.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vqgpt.errors import VqgptError
from vqgpt.files import FileReadError, read_text

IMAGE_TOKENIZER_DIR = "image_tokenizer"  # the pipeline's subfolder holding the VQ-VAE
LAYOUT_FILE = "vqgpt_vocab.json"  # the joint vocabulary's id layout
TRAINER_STATE = "trainer_state.json"  # what marks <run>/checkpoints/step_<N>/ (vqgpt.training)
IMAGE_TOKENIZER_TYPE = "vqgpt_vqvae"
LM_TYPE = "gpt2"
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own limit


class ModelFolderError(VqgptError, FileNotFoundError):
    """A model folder that does not exist, is not a folder, or lacks a file it must hold."""


class DamagedFileError(VqgptError, ValueError):
    """A file a model folder holds that cannot be read: truncated, empty, not what it should be."""


@dataclass(frozen=True)
class FolderKind:
    """A kind of model folder: the files it must hold and what makes one."""

    name: str  # in messages: "image tokenizer"
    files: tuple[str, ...]  # required, relative to the folder
    model_type: str | None  # config.json's model_type, when the kind has a config.json
    make: str  # how a user gets one

    def check(self, folder: str | Path) -> Path:
        """`folder` if it holds every required file, readable and whole; else a clear error."""
        folder = check_is_folder(folder, self)
        for name in self.files:
            check_file(folder / name, self)
        if self.model_type is not None:
            found = read_json(folder / "config.json").get("model_type")
            if found != self.model_type:
                raise DamagedFileError(
                    f"{folder / 'config.json'}: not the config of a vqgpt {self.name} "
                    f"(model_type {found!r}, expected {self.model_type!r}); {self.make}"
                )
        return folder


IMAGE_TOKENIZER = FolderKind(
    "image tokenizer",
    ("config.json", "model.safetensors"),
    IMAGE_TOKENIZER_TYPE,
    "train one with `vqgpt train-tokenizer`",
)
LANGUAGE_MODEL = FolderKind(
    "language model",
    ("config.json", "model.safetensors"),
    LM_TYPE,
    "train one with `vqgpt train-lm`",
)
JOINT_VOCABULARY = FolderKind(
    "joint vocabulary",
    ("tokenizer.json", "tokenizer_config.json", LAYOUT_FILE),
    None,
    "save one with JointTokenizer.save_pretrained, or train a pipeline with `vqgpt train-lm`",
)
PIPELINE = FolderKind(
    "pipeline",
    (
        *LANGUAGE_MODEL.files,
        *JOINT_VOCABULARY.files,
        *(f"{IMAGE_TOKENIZER_DIR}/{name}" for name in IMAGE_TOKENIZER.files),
    ),
    LM_TYPE,
    "train one with `vqgpt train-lm`",
)


# ---------------------------------------------------------------------------------------------
# single files


def check_is_folder(folder: str | Path, kind: FolderKind) -> Path:
    """`folder` as a Path if it is an existing folder; else which of the two it is not."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such folder (expected a vqgpt {kind.name})")
    if not folder.is_dir():
        raise ModelFolderError(
            f"{folder} is a file; a vqgpt {kind.name} is a folder (a run folder or its final/)"
        )
    return folder


def check_file(path: Path, kind: FolderKind) -> None:
    """`path` exists, is a readable file and, for JSON and safetensors, is whole."""
    if not path.exists():
        missing = path if path.parent.is_dir() else path.parent  # a whole subfolder may be gone
        shown = missing.name + ("" if missing == path else "/")
        raise ModelFolderError(
            f"{missing.parent}: {shown} is missing, the {kind.name} folder is incomplete; copy "
            f"the whole folder again or {kind.make}"
        )
    if not path.is_file():
        raise ModelFolderError(f"{path} is not a file; the {kind.name} folder is damaged")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        raise DamagedFileError(f"{path}: cannot be read ({err.strerror or err})") from err
    if path.suffix == ".json":
        read_json(path)
    elif path.suffix == ".safetensors":
        check_safetensors(path)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; an empty, truncated or non-object file is a DamagedFileError."""
    try:
        text = read_text(path)
    except FileReadError as err:
        raise DamagedFileError(f"{err}; the file is damaged") from None
    if not text.strip():
        raise DamagedFileError(f"{path}: the file is empty; copy the folder again")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFileError(
            f"{path}: not valid JSON (truncated or damaged: {err.msg} at line {err.lineno} "
            f"column {err.colno}); copy the folder again"
        ) from err
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path: Path) -> None:
    """The header parses and the file is exactly as long as the tensors it lists."""
    size = path.stat().st_size

    def damaged(why: str) -> DamagedFileError:
        return DamagedFileError(
            f"{path}: damaged weights file ({why}); copy the folder again or retrain"
        )

    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise damaged(f"{size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise damaged(f"a header of {header_len} bytes in a file of {size} bytes")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged("the header is not JSON: truncated, or not a safetensors file") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise damaged("the header lists tensors without data offsets") from None
    if 8 + header_len + end != size:
        raise damaged(f"{size} bytes where the header lists {8 + header_len + end}: truncated")


# ---------------------------------------------------------------------------------------------
# run folders


def model_root(path: str | Path, kind: FolderKind) -> Path:
    """The folder a model loads from: `path/final` of a finished run, else `path` itself.

    A run folder without `final/` (still training, or stopped) and a training checkpoint
    (`checkpoints/step_<N>/`) are `ModelFolderError`s that say which folder to pass instead.
    """
    path = check_is_folder(path, kind)
    if (path / "final").is_dir():
        return path / "final"
    if (path / TRAINER_STATE).is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise ModelFolderError(
            f"{path} is a training checkpoint (optimizer state to resume from), not a model; "
            f"pass the finished run {run} (its final/ folder), or resume the run with "
            f"--resume {path}"
        )
    if (
        path.name == "checkpoints"
        or (path / "checkpoints").is_dir()
        or (path / "final.tmp").exists()
    ):
        run = path.parent if path.name == "checkpoints" else path
        raise ModelFolderError(
            f"{run} has no final/ folder yet: the run is still training or stopped before the "
            f"end; wait for it, or resume it with `--resume latest`"
        )
    return path


def is_pipeline(folder: Path) -> bool:
    """Whether `folder` is (an incomplete or complete) pipeline rather than an image tokenizer."""
    if (folder / LAYOUT_FILE).exists() or (folder / IMAGE_TOKENIZER_DIR).exists():
        return True
    config = folder / "config.json"
    return config.is_file() and read_json(config).get("model_type") == LM_TYPE


def pipeline_dir(path: str | Path) -> Path:
    """The checked pipeline folder of a run, its final/, or an export."""
    root = model_root(path, PIPELINE)
    config = root / "config.json"
    if not is_pipeline(root) and config.is_file():
        if read_json(config).get("model_type") == IMAGE_TOKENIZER_TYPE:
            raise ModelFolderError(
                f"{root} holds an image tokenizer (stage one) only; this needs a pipeline: "
                f"{PIPELINE.make} on top of it"
            )
    return PIPELINE.check(root)


def image_tokenizer_dir(path: str | Path) -> Path:
    """The checked image tokenizer folder of a tokenizer run, an LM run, a pipeline or an export."""
    root = model_root(path, IMAGE_TOKENIZER)
    if is_pipeline(root):
        check_file(root / IMAGE_TOKENIZER_DIR / "config.json", PIPELINE)
        root = root / IMAGE_TOKENIZER_DIR
    return IMAGE_TOKENIZER.check(root)


@contextmanager
def loading(folder: Path, kind: FolderKind) -> Iterator[None]:
    """Turn what a library raises while loading a checked folder into a one-line vqgpt error."""
    try:
        yield
    except VqgptError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise DamagedFileError(
            f"{folder}: the {kind.name} does not load ({type(err).__name__}: {first}); the "
            f"folder is damaged or from another version: copy it again or {kind.make}"
        ) from err


def check_loading_info(folder: Path, kind: FolderKind, info: dict) -> None:
    """Weights missing from, or shaped unlike, the model (`output_loading_info=True`)."""
    missing, mismatched = sorted(info.get("missing_keys") or ()), info.get("mismatched_keys")
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shaped unlike the model: {mismatched}"
        raise DamagedFileError(
            f"{folder / 'model.safetensors'}: weights {what} (from another model?); the "
            f"{kind.name} folder mixes files of different runs: copy it again or {kind.make}"
        )


__all__ = [
    "IMAGE_TOKENIZER",
    "IMAGE_TOKENIZER_DIR",
    "JOINT_VOCABULARY",
    "LANGUAGE_MODEL",
    "LAYOUT_FILE",
    "PIPELINE",
    "DamagedFileError",
    "FolderKind",
    "ModelFolderError",
    "check_loading_info",
    "image_tokenizer_dir",
    "is_pipeline",
    "loading",
    "model_root",
    "pipeline_dir",
    "read_json",
]
