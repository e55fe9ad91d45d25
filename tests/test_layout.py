"""The package's shape, read from its source: which folder may import which, and how.

Every `import` and `from ... import` in src/vqgpt (lazy ones inside functions included) is read
with `ast`; nothing is imported. The rules (README, "Architecture"; docs/design.md, "Layout"):
- `tokenizer/` (stage one) never imports `lm`, `eval`, the export machinery, the CLI or the demo;
- `lm/` (stage two) never imports `eval`, the export machinery, the CLI or the demo;
- `data/` imports no model, no training loop, nothing of either stage;
- models (the VQ-VAE and its parts, the GPT-2 and its loss) never import training loops or the CLI;
- `export/hub/` (the remote code shipped in exports) imports only the standard library, torch,
  transformers, numpy, PIL and its own files (the Space's web app and its backend also gradio and
  yaml); every layer may import it (it is the one implementation of what an export ships), while
  the rest of `export/` is for the CLI only;
- `app/` (`vqgpt app`'s backend over vqgpt) is for the CLI only;
- nothing imports the CLI or the demo but the CLI;
- a name is imported from the module that defines it, and no module imports another's private
  (underscored) names.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

import vqgpt

SRC = Path(vqgpt.__file__).resolve().parent  # src/vqgpt
HUB = "vqgpt.export.hub"
HUB_ALLOWED = {"torch", "transformers", "numpy", "PIL", "__future__"}
# the Space's files (an export's app.py and its backend) also import gradio and yaml, and their
# siblings by plain name (in a Space they are top-level modules beside app.py)
SPACE_MODULES = {f"{HUB}.app_vqgpt": {"gradio"}, f"{HUB}.generation_vqgpt": {"yaml"}}
HUB_FILES = {p.stem for p in (SRC / "export" / "hub").glob("*.py")}

STAGE_ONE_FORBIDDEN = ("vqgpt.lm", "vqgpt.eval", "vqgpt.export", "vqgpt.cli", "vqgpt.demo")
STAGE_TWO_FORBIDDEN = ("vqgpt.eval", "vqgpt.export", "vqgpt.cli", "vqgpt.demo")
DATA_FORBIDDEN = (
    "vqgpt.tokenizer",
    "vqgpt.lm",
    "vqgpt.eval",
    "vqgpt.export",
    "vqgpt.training",
    "vqgpt.cli",
    "vqgpt.demo",
)
MODELS = (
    "vqgpt.tokenizer.quantize",
    "vqgpt.tokenizer.kernels",
    "vqgpt.tokenizer.vqvae",
    "vqgpt.tokenizer.losses",
    "vqgpt.lm.model",
    "vqgpt.lm.loss",
)
TRAINING_LOOPS = ("vqgpt.training", "vqgpt.tokenizer.train", "vqgpt.lm.train")


class Import(NamedTuple):
    """One imported name (or module) in one file."""

    importer: str  # dotted module that imports
    module: str  # dotted module imported from (absolute)
    name: str | None  # the name taken from it (None: `import module`)
    line: int

    def __str__(self) -> str:
        what = f"from {self.module} import {self.name}" if self.name else f"import {self.module}"
        return f"{self.importer}:{self.line}: {what}"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = ["vqgpt", *path.relative_to(src).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, src: Path = SRC) -> list[Import]:
    """Every import in `path`, relative ones resolved against its package."""
    importer = module_name(path, src)
    package = importer if path.name == "__init__.py" else importer.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            found += [Import(importer, module, a.name, node.lineno) for a in node.names]
    return found


def package_imports(src: Path = SRC) -> list[Import]:
    return [imp for path in sorted(src.rglob("*.py")) for imp in imports_of(path, src)]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def target(imp: Import, src: Path = SRC) -> str:
    """The module an import reaches: `from vqgpt.lm import vocab` reaches vqgpt.lm.vocab."""
    if imp.name and (src / Path(*imp.module.split(".")[1:]) / f"{imp.name}.py").is_file():
        return f"{imp.module}.{imp.name}"
    return imp.module


def violations(imports: list[Import], root: Path = SRC) -> list[str]:
    """Every import that breaks a rule of the module docstring, as a readable line."""
    bad = []
    for imp in imports:
        src, dst = imp.importer, target(imp, root)
        if under(src, HUB):
            top = dst.split(".")[0]
            allowed = HUB_ALLOWED | SPACE_MODULES.get(src, set())
            sibling = src in SPACE_MODULES and dst in HUB_FILES
            if not (under(dst, HUB) or top in allowed or top in sys.stdlib_module_names or sibling):
                bad.append(f"{imp} -- export/hub/ imports only torch, transformers, numpy, PIL")
            continue
        if not dst.startswith("vqgpt") or under(dst, HUB):
            continue
        rules = []
        if under(src, "vqgpt.tokenizer"):
            rules.append((STAGE_ONE_FORBIDDEN, "stage one (tokenizer/) never imports"))
        if under(src, "vqgpt.lm"):
            rules.append((STAGE_TWO_FORBIDDEN, "stage two (lm/) never imports"))
        if under(src, "vqgpt.data"):
            rules.append((DATA_FORBIDDEN, "data/ imports no model or training code:"))
        if src in MODELS:
            rules.append((TRAINING_LOOPS + ("vqgpt.cli", "vqgpt.demo"), "models never import"))
        if src != "vqgpt.cli":
            rules.append((("vqgpt.cli", "vqgpt.demo"), "only the CLI imports"))
        if src != "vqgpt.cli" and not under(src, "vqgpt.app"):
            rules.append((("vqgpt.app",), "only the CLI imports"))
        for forbidden, why in rules:
            hit = next((f for f in forbidden if under(dst, f)), None)
            if hit:
                bad.append(f"{imp} -- {why} {hit}")
                break
    return bad


def defined_names(module: str) -> set[str]:
    """Top-level names a module defines (functions, classes, assignments, try/if blocks)."""
    rel = Path(*module.split(".")[1:])
    path = SRC / rel.with_suffix(".py")
    if not path.is_file():
        path = SRC / rel / "__init__.py"
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for sub in [node, *ast.walk(node)] if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(sub.name)
            elif isinstance(sub, ast.Assign):
                names |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
            elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                names.add(sub.target.id)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)) and isinstance(node, ast.Try):
                names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return names


def origin_problems(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not imp.name or not imp.module.startswith("vqgpt") or target(imp) != imp.module:
            continue
        if under(imp.importer, HUB) and under(imp.module, HUB):
            continue  # the remote code's own relative imports
        if imp.name.startswith("_"):
            bad.append(f"{imp} -- a private name of another module")
        elif imp.name not in defined_names(imp.module):
            bad.append(f"{imp} -- not defined there: import it from the module that defines it")
    return bad


def test_the_package_follows_its_import_rules():
    assert violations(package_imports()) == []


def test_names_come_from_their_defining_module_and_none_is_private():
    assert origin_problems(package_imports()) == []


@pytest.mark.parametrize(
    "importer, line, rule",
    [
        ("tokenizer/quantize.py", "from vqgpt.lm.vocab import VocabLayout", "stage one"),
        ("tokenizer/codec.py", "from vqgpt.eval import report", "stage one"),
        ("tokenizer/train.py", "import vqgpt.export.folder", "stage one"),
        ("lm/generate.py", "from vqgpt.eval.shape_checker import check", "stage two"),
        ("data/sources.py", "from vqgpt.tokenizer.vqvae import VQVAE", "data/"),
        ("lm/model.py", "from vqgpt.training import TrainConfig", "models never"),
        ("tokenizer/vqvae.py", "from vqgpt.tokenizer.train import train_tokenizer", "models never"),
        ("eval/report.py", "from vqgpt.demo import run_demo", "only the CLI"),
        ("export/hub/modeling_vqgpt.py", "from vqgpt.config import to_dict", "export/hub/"),
        ("export/hub/modeling_vqgpt.py", "import einops", "export/hub/"),
        ("export/hub/modeling_vqgpt.py", "import gradio", "export/hub/"),
        ("export/hub/app_vqgpt.py", "from vqgpt.lm.infer import caption_images", "export/hub/"),
        ("lm/infer.py", "from vqgpt.app.backend import VqgptBackend", "only the CLI"),
    ],
)
def test_a_wrong_import_is_caught(tmp_path, importer, line, rule):
    """Each rule fails on a deliberately wrong import added to a copy of the package."""
    copy = tmp_path / "vqgpt"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / importer
    path.write_text(path.read_text() + f"\n{line}\n")
    found = violations(package_imports(copy), copy)
    assert len(found) == 1 and rule in found[0], found


def test_a_private_or_misplaced_import_is_caught():
    fake = [
        Import("vqgpt.lm.fast_sampling", "vqgpt.lm.generate", "_base_seed", 1),
        Import("vqgpt.eval.pipeline", "vqgpt.data.sources", "load_rgb", 2),
    ]
    found = origin_problems(fake)
    assert [f.split(" -- ")[1][:9] for f in found] == ["a private", "not defin"]
