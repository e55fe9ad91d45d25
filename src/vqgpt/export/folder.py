"""Export a trained run to the Hugging Face Hub format: loadable with transformers, without vqgpt.

Layout of an export folder (a pipeline folder, see `vqgpt.lm.pipeline`, plus remote code and a card,
so vqgpt itself also loads it wherever it takes a run folder):

    README.md                                       model card: metadata, usage, layout, scores
    config.json, model.safetensors,                 the GPT-2 (AutoModelForCausalLM)
      generation_config.json
    tokenizer.json, tokenizer_config.json,          the joint vocabulary (AutoTokenizer)
      vqgpt_vocab.json
    processor_config.json, processing_vqgpt.py      VQGPTProcessor (AutoProcessor, remote code):
                                                    images / text <-> token sequences
    preprocessor_config.json,                       VQGPTImageProcessor (AutoImageProcessor)
      image_processing_vqgpt.py
    app.py, generation_vqgpt.py, requirements.txt   the Space: the web app (hub/app_vqgpt.py)
                                                    over this folder, transformers + gradio only
    configuration_vqgpt.py, modeling_vqgpt.py,      copies for `subfolder="image_tokenizer"`
      quantization_vqgpt.py                         (transformers finds remote code at the root)
    image_tokenizer/                                the VQ-VAE, a self-contained Hub model folder:
      config.json, model.safetensors,                 AutoModel (remote code): encode / decode;
      configuration_vqgpt.py, modeling_vqgpt.py,      the weights file is vqgpt's, byte for byte;
        quantization_vqgpt.py                         every quantizer family (quantizer.type)
      preprocessor_config.json,                       AutoImageProcessor
        image_processing_vqgpt.py

A stage-one (tokenizer-only) run exports README.md, image_tokenizer/ and the root copies of its
remote code. The remote code is `vqgpt/export/hub/`, copied verbatim: it imports only torch,
transformers, numpy and PIL, and vqgpt itself runs the same files (one implementation).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from vqgpt.artifacts import (
    IMAGE_TOKENIZER,
    IMAGE_TOKENIZER_DIR,
    JOINT_VOCABULARY,
    LANGUAGE_MODEL,
    LAYOUT_FILE,
    PIPELINE,
    is_pipeline,
    model_root,
    read_json,
)
from vqgpt.config import load_yaml
from vqgpt.errors import VqgptError
from vqgpt.export.card import model_card
from vqgpt.export.hub.configuration_vqgpt import token_grid, upgrade_quantizer_keys
from vqgpt.files import write_text
from vqgpt.lm.vocab import VocabLayout, tokenizer_config_for_users
from vqgpt.tokenizer.vqvae import VQVAE

HUB_CODE_DIR = Path(__file__).parent / "hub"
TOKENIZER_AUTO_MAP = {
    "AutoConfig": "configuration_vqgpt.VQVAEConfig",
    "AutoModel": "modeling_vqgpt.VQVAE",
}
CODE_FILES = (
    "configuration_vqgpt.py",
    "modeling_vqgpt.py",
    "quantization_vqgpt.py",
    "image_processing_vqgpt.py",
)
IMAGE_PROCESSOR = "image_processing_vqgpt.VQGPTImageProcessor"
PROCESSOR = "processing_vqgpt.VQGPTProcessor"
OPTIONAL_LM_FILES = ("generation_config.json",)  # copied when the run has it
SPACE_FILES = {"app_vqgpt.py": "app.py", "generation_vqgpt.py": "generation_vqgpt.py"}
SPACE_REQUIREMENTS = (  # what app.py and the remote code import, in vqgpt's tested ranges
    "torch>=2.4",
    "transformers>=5.0",
    "gradio>=6,<7",
    "numpy>=1.26",
    "pillow>=10",
    "safetensors>=0.4",
    "pyyaml>=6",
)
METRICS_FILES = ("metrics.json", "eval/metrics.json", "report/metrics.json")
GIVEN_METRICS_ADVICE = (  # what to do about a damaged metrics.json passed with --metrics
    "pass the metrics.json a `vqgpt eval --out DIR` wrote (DIR/metrics.json), or leave out "
    "--metrics"
)
METRICS_ADVICE = (  # ... and about one found in the run
    "write it again with `vqgpt eval`, or delete it to export without scores"
)
FILE_MODE, DIR_MODE = 0o644, 0o755  # an export is shared: everyone may read it


class ExportError(VqgptError, ValueError):
    """A run that cannot be exported, or an output folder that must not be replaced."""


class PushError(VqgptError, RuntimeError):
    """The upload to the Hub failed; the local export is complete."""


@dataclass
class ExportConfig:
    """What to export, where to, and whether to push it to the Hub."""

    run: str  # an LM run (or its final/), or a stage-one tokenizer run (or its final/)
    out: str  # the export folder (replaced if it holds an earlier export)
    push_to_hub: str | None = None  # "org/name": upload the folder there
    private: bool = False  # create the Hub repo private
    revision: str | None = None  # branch to upload to (created if missing); None: main
    metrics: str | None = None  # a `vqgpt eval` metrics.json; None: looked for in the run


class RunParts(NamedTuple):
    """Where a run keeps the parts that get exported."""

    image_tokenizer: Path  # folder with the VQVAE's config.json + model.safetensors
    pipeline: Path | None  # LM + joint vocabulary folder; None for a tokenizer-only run
    recipe: dict  # the run's config.yaml ({} when absent)
    run_dirs: tuple[Path, ...]  # the folders searched for config.yaml and metrics


class ExportResult(NamedTuple):
    """What `export_run` wrote (and pushed)."""

    folder: Path
    has_lm: bool
    url: str | None  # the Hub repo URL after a push


# ---------------------------------------------------------------------------------------------
# finding the parts


def _read_json(path: Path, advice: str = "copy the run folder again") -> dict:
    return read_json(path, advice)


def find_run_parts(path: str | Path) -> RunParts:
    """The parts of an LM run, a tokenizer run, their final/ folders, or an earlier export,
    each checked to hold what it must (`vqgpt.artifacts`)."""
    path = Path(path)
    root = model_root(path, PIPELINE)
    if is_pipeline(root):
        pipeline = PIPELINE.check(root)
        image_tokenizer = IMAGE_TOKENIZER.check(root / IMAGE_TOKENIZER_DIR)
    elif any((root / name).exists() for name in IMAGE_TOKENIZER.files):
        image_tokenizer, pipeline = IMAGE_TOKENIZER.check(root), None
    else:
        raise ExportError(
            f"{path}: not a vqgpt run (no pipeline from `vqgpt train-lm` and no image "
            f"tokenizer from `vqgpt train-tokenizer` in it or in its final/)"
        )
    VQVAE.check_weights(image_tokenizer)  # its config.json fits its weights
    run = root.parent if root.name == "final" else root
    run_dirs = tuple(dict.fromkeys([path, root, run]))
    recipe: dict = {}
    for folder in run_dirs:
        if (folder / "config.yaml").is_file():
            recipe = load_yaml(folder / "config.yaml") or {}
            break
    return RunParts(image_tokenizer, pipeline, recipe, run_dirs)


def find_metrics(parts: RunParts, metrics: str | Path | None = None) -> dict:
    """`vqgpt eval` scores (metrics.json) given, found in the run, or in the report beside it
    (`vqgpt demo`: <demo>/report/ next to <demo>/lm/); else the tokenizer's eval."""
    if metrics is not None:
        path = Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(f"--metrics {path}: no such file")
        return _read_json(path, GIVEN_METRICS_ADVICE)
    for folder in parts.run_dirs:
        for name in METRICS_FILES:
            if (folder / name).is_file():
                return _read_json(folder / name, METRICS_ADVICE)
    if parts.pipeline is not None and parts.pipeline.name == "final":  # a run, not an export
        beside = parts.pipeline.parent.parent / "report" / "metrics.json"
        if beside.is_file():
            return _read_json(beside, METRICS_ADVICE)
    tokenizer_eval = parts.image_tokenizer / "eval.json"  # stage one's held-out evaluation
    if parts.pipeline is None and tokenizer_eval.is_file():
        return {"tokenizer": _read_json(tokenizer_eval)}
    return {}


def data_source(parts: RunParts) -> str | None:
    """The recipe's data.source (the images' source of an LM recipe), if any."""
    data = parts.recipe.get("data") or {}
    images = data.get("images") if isinstance(data.get("images"), dict) else data
    return images.get("source") if isinstance(images, dict) else None


# ---------------------------------------------------------------------------------------------
# writing


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_code(names: tuple[str, ...], folder: Path) -> None:
    for name in names:
        shutil.copy2(HUB_CODE_DIR / name, folder / name)


def _image_processor_config(image_size: int, with_processor: bool) -> dict:
    auto_map = {"AutoImageProcessor": IMAGE_PROCESSOR}
    config: dict[str, Any] = {
        "image_processor_type": "VQGPTImageProcessor",
        "image_size": image_size,
    }
    if with_processor:
        auto_map["AutoProcessor"] = PROCESSOR
        config["processor_class"] = "VQGPTProcessor"
    return {**config, "auto_map": auto_map}


def write_image_tokenizer(src: Path, root: Path) -> dict:
    """image_tokenizer/: config.json (+ auto_map), the same weights, remote code, processor.

    The remote code goes to `root` too: transformers looks for it at the repo root when loading
    with `subfolder="image_tokenizer"`.
    """
    dst = root / IMAGE_TOKENIZER_DIR
    dst.mkdir(parents=True)
    config = _read_json(src / "config.json")
    config["quantizer"] = upgrade_quantizer_keys(config["quantizer"])  # a 0.1 run's old names
    config["auto_map"] = TOKENIZER_AUTO_MAP
    _write_json(dst / "config.json", config)
    shutil.copy2(src / "model.safetensors", dst / "model.safetensors")
    image_size = config["architecture"]["image_size"]
    _write_json(dst / "preprocessor_config.json", _image_processor_config(image_size, False))
    for folder in (dst, root):
        _copy_code(CODE_FILES, folder)
    return config


def write_pipeline(src: Path, dst: Path, image_size: int) -> VocabLayout:
    """The GPT-2 and joint vocabulary files as they are (the tokenizer's config made for users:
    typed text stays text, the context is the model's), plus the processor's configs and code."""
    optional = [name for name in OPTIONAL_LM_FILES if (src / name).is_file()]
    for name in (*LANGUAGE_MODEL.files, *JOINT_VOCABULARY.files, *optional):
        shutil.copy2(src / name, dst / name)
    lm_config = _read_json(src / "config.json")
    if lm_config.get("image_positions") is not None:
        raise ExportError(
            f"{src}: this LM was trained with sequences.image_positions=shared (every image's "
            "codes at shared position ids), which transformers' generate() in the exported folder "
            "does not reproduce; export a model trained with sequential positions, or use it "
            "through vqgpt (vqgpt generate / caption / serve)"
        )
    tokenizer_config = _read_json(src / "tokenizer_config.json")
    _write_json(
        dst / "tokenizer_config.json",
        tokenizer_config_for_users(tokenizer_config, lm_config["n_positions"]),
    )
    layout = VocabLayout.from_dict(_read_json(src / LAYOUT_FILE), str(src / LAYOUT_FILE))
    _copy_code(("processing_vqgpt.py",), dst)
    write_space(dst)
    _write_json(dst / "preprocessor_config.json", _image_processor_config(image_size, True))
    processor = {
        "processor_class": "VQGPTProcessor",
        "auto_map": {"AutoProcessor": PROCESSOR},
        "layout": layout.to_dict(),
        # the prompt format the LM was trained with (sequences.t2i_prefix_length)
        "t2i_prefix_length": lm_config.get("t2i_prefix_length"),
    }
    _write_json(dst / "processor_config.json", processor)
    return layout


def write_space(dst: Path) -> None:
    """The Space: app.py (the web app, `hub/app_vqgpt.py`), its transformers backend and
    requirements.txt (what those files import; the card carries the Space's metadata)."""
    for src, name in SPACE_FILES.items():
        shutil.copy2(HUB_CODE_DIR / src, dst / name)
    write_text(dst / "requirements.txt", "\n".join(SPACE_REQUIREMENTS) + "\n")


def _check_parts(image_config: dict, layout: VocabLayout, lm_config: dict) -> None:
    grid = token_grid(image_config["architecture"])
    layout.check_compatible(image_config["quantizer"]["codebook_size"], grid)
    real = lm_config.get("real_vocab_size") or lm_config["vocab_size"]
    if real != layout.vocab_size:
        raise ExportError(
            f"the LM has {real} real vocabulary rows but {LAYOUT_FILE} has {layout.vocab_size} "
            "ids: the run folder mixes parts of different runs"
        )


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside `out`; `out` itself must be absent, empty or an export."""
    if out.exists() and any(out.iterdir()):
        if not (out / IMAGE_TOKENIZER_DIR / "modeling_vqgpt.py").is_file():
            raise ExportError(
                f"--out {out} exists and is not an earlier vqgpt export; choose a new folder"
            )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def make_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 under `folder` (safetensors writes 0600; copies keep it)."""
    folder.chmod(DIR_MODE)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def export_run(cfg: ExportConfig) -> ExportResult:
    """Write the export folder (via a temporary folder and a rename), then push it if asked."""
    parts = find_run_parts(cfg.run)
    metrics = find_metrics(parts, cfg.metrics)
    out = Path(cfg.out)
    tmp = _prepare_out(out)
    try:
        image_config = write_image_tokenizer(parts.image_tokenizer, tmp)
        layout = None
        if parts.pipeline is not None:
            image_size = image_config["architecture"]["image_size"]
            layout = write_pipeline(parts.pipeline, tmp, image_size)
            _check_parts(image_config, layout, _read_json(tmp / "config.json"))
        name = cfg.push_to_hub or out.name
        card = model_card(
            name, cfg.push_to_hub or str(out), image_config, layout, metrics, data_source(parts)
        )
        write_text(tmp / "README.md", card)
        make_readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    url = None
    if cfg.push_to_hub:
        url = push_folder(out, cfg.push_to_hub, private=cfg.private, revision=cfg.revision)
    return ExportResult(out, parts.pipeline is not None, url)


# ---------------------------------------------------------------------------------------------
# pushing


def _failure_reason(err: BaseException) -> str:
    names = {c.__name__ for c in type(err).__mro__}
    if isinstance(err, ConnectionError) or names & {"TransportError", "NetworkError"}:
        return "cannot reach the Hugging Face Hub (no network, HF_HUB_OFFLINE set, or HF_ENDPOINT)"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if "LocalTokenNotFoundError" in names or status in (401, 403):
        return "not allowed to write there: log in with `hf auth login` or set HF_TOKEN"
    return "the upload failed"


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: str | None = None):
    """Upload `folder` to the model repo `repo_id` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message="vqgpt export",
        )
    except Exception as err:
        raise PushError(
            f"push to {repo_id} failed: {_failure_reason(err)} ({type(err).__name__}: {err}). "
            f"The local export {folder} is complete; upload it later with "
            f"`hf upload {repo_id} {folder}` or rerun with --push-to-hub"
        ) from err
    return str(url)


__all__ = [
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "PushError",
    "RunParts",
    "export_run",
    "find_metrics",
    "find_run_parts",
    "make_readable",
    "push_folder",
    "write_image_tokenizer",
    "write_pipeline",
    "write_space",
]
