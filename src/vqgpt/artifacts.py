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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vqgpt.errors import VqgptError
from vqgpt.files import FileReadError, json_error, read_text

IMAGE_TOKENIZER_DIR = "image_tokenizer"  # the pipeline's subfolder holding the VQ-VAE
LAYOUT_FILE = "vqgpt_vocab.json"  # the joint vocabulary's id layout
TRAINER_STATE = "trainer_state.json"  # what marks <run>/checkpoints/step_<N>/ (vqgpt.training)
IMAGE_TOKENIZER_TYPE = "vqgpt_vqvae"
LM_TYPE = "gpt2"
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own limit
COPY_AGAIN = "copy the folder again"  # what to do about a damaged file of a model folder
GPT2_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # config.json needs


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
    optional: tuple[str, ...] = ()  # files it may hold, checked (readable, whole) when present
    # checks config.json against the weights' header (folder, kind), before anything loads
    check_config: Callable[[Path, FolderKind], None] | None = None

    def check(self, folder: str | Path) -> Path:
        """`folder` if it holds every required file, readable and whole, its optional files
        whole where present, and a config.json that fits its weights; else a clear error."""
        folder = check_is_folder(folder, self)
        for name in self.files:
            check_file(folder / name, self)
        for name in self.optional:
            if (folder / name).exists() or (folder / name).is_symlink():
                check_file(folder / name, self)
        if self.model_type is not None:
            found = read_json(folder / "config.json").get("model_type")
            if found != self.model_type:
                raise DamagedFileError(
                    f"{folder / 'config.json'}: not the config of a vqgpt {self.name} "
                    f"(model_type {found!r}, expected {self.model_type!r}); {self.make}"
                )
        if self.check_config is not None:
            self.check_config(folder, self)
        return folder


# ---------------------------------------------------------------------------------------------
# config.json against the weights


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header of a safetensors file that `check_safetensors`
    passed."""
    return {
        name: list(entry.get("shape", ()))
        for name, entry in check_safetensors(path).items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def config_mismatch(folder: Path, kind: FolderKind, what: str) -> DamagedFileError:
    """config.json and model.safetensors of `folder` disagree about `what`."""
    return DamagedFileError(
        f"{folder / 'config.json'} does not fit {folder / 'model.safetensors'}: {what}; the "
        f"{kind.name} folder mixes files of different runs or config.json was edited: copy "
        f"it again or {kind.make}"
    )


def check_shapes(
    folder: Path, kind: FolderKind, expected: dict[str, tuple[int, ...] | list[int]]
) -> None:
    """Every tensor the config implies (`expected`: name -> shape) is in model.safetensors with
    that shape, and the weights hold no other; else the first disagreement, as one line."""
    held = safetensors_shapes(folder / "model.safetensors")
    for name, shape in expected.items():
        if name not in held:
            raise config_mismatch(folder, kind, f"the config implies {name}, the weights lack it")
        if list(held[name]) != list(shape):
            raise config_mismatch(
                folder,
                kind,
                f"the config implies {name} of shape {list(shape)}, the weights hold "
                f"{list(held[name])}",
            )
    extra = sorted(set(held) - set(expected))
    if extra:
        raise config_mismatch(
            folder, kind, f"the weights hold {extra[0]}, which the config does not imply"
        )


def check_gpt2_config(folder: Path, kind: FolderKind) -> None:
    """The sizes config.json gives (vocab_size, n_positions, n_embd, n_layer, n_head, n_inner)
    are there and are those of the weights: transformers would otherwise build GPT-2's
    defaults (12 layers, 1024 positions) and fail after a long report, or export would."""
    config = read_json(folder / "config.json")
    shapes = {
        name.removeprefix("transformer."): shape
        for name, shape in safetensors_shapes(folder / "model.safetensors").items()
    }
    layers = {name.split(".")[1] for name in shapes if name.startswith("h.")}
    wte, wpe = shapes.get("wte.weight"), shapes.get("wpe.weight")
    held: dict[str, int] = {"n_layer": len(layers)}
    if wte is not None and len(wte) == 2:
        held |= {"vocab_size": wte[0], "n_embd": wte[1]}
    if wpe is not None and len(wpe) == 2:
        held["n_positions"] = wpe[0]
    missing = [key for key in GPT2_SIZES if key not in config]
    if missing:
        known = ", ".join(f"{k}={held[k]}" for k in missing if k in held)
        raise config_mismatch(
            folder,
            kind,
            f"config.json lacks {', '.join(missing)}"
            + (f" (model.safetensors holds {known})" if known else ""),
        )
    for key in GPT2_SIZES:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DamagedFileError(
                f"{folder / 'config.json'}: {key}={value!r} is not a positive integer; "
                f"{COPY_AGAIN} or {kind.make}"
            )
    if wte is None or wpe is None:
        raise config_mismatch(
            folder, kind, "model.safetensors holds no wte/wpe embeddings: not a GPT-2's weights"
        )
    for key in ("n_layer", "vocab_size", "n_embd", "n_positions"):
        if config[key] != held.get(key):
            raise config_mismatch(
                folder,
                kind,
                f"config.json says {key}={config[key]}, model.safetensors holds {key}="
                f"{held.get(key)}",
            )
    if config["n_embd"] % config["n_head"]:
        raise DamagedFileError(
            f"{folder / 'config.json'}: n_embd={config['n_embd']} is not a multiple of "
            f"n_head={config['n_head']}; {COPY_AGAIN} or {kind.make}"
        )
    n_inner = config.get("n_inner") or 4 * config["n_embd"]
    c_fc = shapes.get("h.0.mlp.c_fc.weight")
    if c_fc is not None and c_fc != [config["n_embd"], n_inner]:
        raise config_mismatch(
            folder,
            kind,
            f"config.json says n_inner={config.get('n_inner')} ({n_inner} units), "
            f"model.safetensors holds {c_fc[-1]}",
        )


IMAGE_TOKENIZER_SECTIONS = {"architecture": ("image_size",), "quantizer": ("codebook_size",)}


def check_image_tokenizer_config(folder: Path, kind: FolderKind) -> None:
    """config.json has the sections (and the sizes in them) every reader of an image tokenizer
    needs; the full comparison with the weights is `VQVAE.check_weights` (it builds the model)."""
    path = folder / "config.json"
    config = read_json(path)
    for section, keys in IMAGE_TOKENIZER_SECTIONS.items():
        if not isinstance(config.get(section), dict):
            raise DamagedFileError(
                f"{path}: lacks its {section!r} section; {COPY_AGAIN} or {kind.make}"
            )
        missing = [key for key in keys if key not in config[section]]
        if missing:
            raise DamagedFileError(
                f"{path}: {section} lacks {', '.join(missing)}; {COPY_AGAIN} or {kind.make}"
            )


IMAGE_TOKENIZER = FolderKind(
    "image tokenizer",
    ("config.json", "model.safetensors"),
    IMAGE_TOKENIZER_TYPE,
    "train one with `vqgpt train-tokenizer`",
    check_config=check_image_tokenizer_config,
)
LANGUAGE_MODEL = FolderKind(
    "language model",
    ("config.json", "model.safetensors"),
    LM_TYPE,
    "train one with `vqgpt train-lm`",
    optional=("generation_config.json",),
    check_config=check_gpt2_config,
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
    optional=LANGUAGE_MODEL.optional,
    check_config=check_gpt2_config,
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


def read_json(path: Path, advice: str = COPY_AGAIN) -> dict:
    """A JSON object from `path`; an empty, truncated or non-object file is a DamagedFileError
    ending with `advice` (what to do: fits the file's role, a model folder's by default)."""
    try:
        text = read_text(path)
    except FileReadError as err:
        raise DamagedFileError(f"{err}; {advice}") from None
    if not text.strip():
        raise DamagedFileError(f"{path}: the file is empty; {advice}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFileError(
            f"{path}: not valid JSON (truncated or damaged: {json_error(err)}); {advice}"
        ) from err
    if not isinstance(data, dict):
        raise DamagedFileError(
            f"{path}: expected a JSON object, got {type(data).__name__}; {advice}"
        )
    return data


def check_safetensors(path: Path, advice: str = "copy the folder again or retrain") -> dict:
    """The header parses and the file is exactly as long as the tensors it lists; the header.
    Else a DamagedFileError ending with `advice`."""
    size = path.stat().st_size

    def damaged(why: str) -> DamagedFileError:
        return DamagedFileError(f"{path}: damaged weights file ({why}); {advice}")

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
    return header


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


# ---------------------------------------------------------------------------------------------
# training checkpoints: <run>/checkpoints/step_<N>/, written by Accelerate's save_state


RNG_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def checkpoint_files(
    models: int, optimizers: int, schedulers: int, process_index: int, custom_objects: int = 0
) -> tuple[str, ...]:
    """The files a checkpoint must hold for one process to resume from it: what Accelerate's
    save_state writes for the objects it was given (the first of each kind without an index),
    this process's RNG states, and the trainer state vqgpt writes beside them."""

    def named(stem: str, count: int, suffix: str) -> list[str]:
        return [f"{stem}{'' if i == 0 else f'_{i}'}{suffix}" for i in range(count)]

    return (
        TRAINER_STATE,
        *named("model", models, ".safetensors"),
        *named("optimizer", optimizers, ".bin"),
        *named("scheduler", schedulers, ".bin"),
        f"random_states_{process_index}.pkl",
        *(f"custom_checkpoint_{i}.pkl" for i in range(custom_objects)),
    )


def check_checkpoint(folder: Path, files: tuple[str, ...], damaged: str) -> None:
    """Every file of `files` is in the checkpoint `folder`, a readable file, and whole: weights
    by their safetensors header, torch archives (.bin, .pkl) by their zip directory (written
    last, so a file cut short lacks it), this process's RNG states by loading them (Accelerate
    would skip unreadable ones with a log line, and the resume would not be bit-exact).
    `damaged` ends each message: what to do about a damaged checkpoint."""
    import zipfile

    for name in files:
        path = folder / name
        if not path.exists():
            raise DamagedFileError(f"{path} is missing; {damaged}")
        if not path.is_file():
            raise DamagedFileError(f"{path} is not a file; {damaged}")
        try:
            if path.suffix == ".safetensors":
                check_safetensors(path, damaged)
            elif path.suffix in (".bin", ".pkl"):
                with zipfile.ZipFile(path):
                    pass
        except zipfile.BadZipFile:
            raise DamagedFileError(
                f"{path}: cut short or not a torch file (its zip directory is missing); {damaged}"
            ) from None
        except OSError as err:
            raise DamagedFileError(
                f"{path}: cannot be read ({err.strerror or err}); {damaged}"
            ) from None
        if name.startswith("random_states_"):
            check_rng_states(path, damaged)


def check_rng_states(path: Path, damaged: str) -> None:
    """`path` (random_states_<rank>.pkl) loads as Accelerate loads it and holds every state."""
    from accelerate.utils import load

    try:
        states = load(path)
    except Exception as err:  # noqa: BLE001 - unpickling a damaged file raises anything
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DamagedFileError(
            f"{path}: the RNG states do not load ({type(err).__name__}: {first}), so the resume "
            f"would not continue the run exactly; {damaged}"
        ) from None
    missing = [key for key in RNG_STATE_KEYS if not isinstance(states, dict) or key not in states]
    if missing:
        raise DamagedFileError(
            f"{path}: lacks the RNG state(s) {', '.join(missing)}, so the resume would not "
            f"continue the run exactly; {damaged}"
        )


@contextmanager
def loading(folder: Path, kind: FolderKind) -> Iterator[None]:
    """Turn what a library raises while loading a checked folder into a one-line vqgpt error."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report: what it tells ends as one line here
    hf_logging.disable_progress_bar()  # nor "Loading weights" bars before an error line
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
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


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
    "check_checkpoint",
    "check_loading_info",
    "check_rng_states",
    "checkpoint_files",
    "check_safetensors",
    "check_shapes",
    "config_mismatch",
    "safetensors_shapes",
    "image_tokenizer_dir",
    "is_pipeline",
    "loading",
    "model_root",
    "pipeline_dir",
    "read_json",
]
