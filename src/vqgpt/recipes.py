"""The recipes shipped with vqgpt, and how a `--config` path finds one.

The YAML recipes (tokenizer/, lm/, demo/, accelerate/) are package data under `vqgpt/configs/`,
read through importlib.resources, so an installed vqgpt runs its recipes from any folder. In a
checkout, the root `configs` is a link to that folder: one copy of each recipe.

A `--config` value is a file path; when no such file exists, it names the packaged recipe of
that relative path, with or without a leading `configs/` and the `.yaml` suffix: `--config
configs/lm/shapes.yaml`, `--config lm/shapes.yaml` and `--config lm/shapes` are one recipe.
A recipe named inside another recipe (the demo configs' `tokenizer_recipe`, `lm_recipe`) is the
file of that path relative to the naming recipe's folder when one exists there, else the
packaged recipe of that name (`find_nested`): the packaged demo configs name `tokenizer/shapes`,
so a copy of one edited in any folder still finds the packaged recipes.
`python -m vqgpt.recipes [NAME]` prints where the packaged recipes are (e.g. for `accelerate
launch --config_file`).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PACKAGE = "vqgpt"
FOLDER = "configs"  # inside the package
SUFFIX = ".yaml"


def packaged_dir() -> Path:
    """The folder of the packaged recipes (`<site-packages>/vqgpt/configs`)."""
    # a package installed as files (the only way vqgpt installs): files() is a real folder
    return Path(str(resources.files(PACKAGE).joinpath(FOLDER)))


def packaged_recipes() -> list[str]:
    """Every packaged recipe as its relative name, e.g. 'lm/shapes.yaml', sorted."""
    root = packaged_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{SUFFIX}"))


def packaged_recipe(name: str | Path) -> Path | None:
    """The packaged recipe `name` ('lm/shapes.yaml', 'configs/lm/shapes', ...); None if none."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        return None
    if parts[0] == FOLDER:
        parts = parts[1:]
    if not parts:
        return None
    path = packaged_dir().joinpath(*parts)
    for candidate in (path, path.with_name(path.name + SUFFIX)):
        if candidate.is_file():
            return candidate
    return None


def find_config(path: str | Path) -> Path | None:
    """The file `path`, else the packaged recipe that it names, else None."""
    if Path(path).is_file():
        return Path(path)
    return packaged_recipe(path)


def find_nested(name: str | Path, folder: str | Path) -> Path | None:
    """A recipe named inside a recipe in `folder`: the file `folder/name` (or `name`, when
    absolute), else the packaged recipe `name`, else None."""
    beside = Path(folder) / name  # an absolute `name` stays itself
    if beside.is_file():
        return beside
    return packaged_recipe(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m vqgpt.recipes [NAME ...]`: the path of each packaged recipe (all: none given)."""
    names = sys.argv[1:] if argv is None else argv
    status = 0
    for name in names or packaged_recipes():
        found = packaged_recipe(name)
        if found is None:
            print(f"{name}: no such packaged recipe; known: {packaged_recipes()}", file=sys.stderr)
            status = 2
        else:
            print(found)
    return status


__all__ = ["find_config", "find_nested", "packaged_dir", "packaged_recipe", "packaged_recipes"]

if __name__ == "__main__":
    sys.exit(main())
