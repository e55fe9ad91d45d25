"""The `vqgpt` command line: each subcommand parses, loads a config, calls one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _train_tokenizer(args: argparse.Namespace) -> None:
    from .train_tokenizer import load_recipe, train_tokenizer

    recipe = load_recipe(args.config, args.overrides)
    final = train_tokenizer(recipe, resume=args.resume)
    print(f"tokenizer saved to {final}")


def _train_lm(args: argparse.Namespace) -> None:
    from .train_lm import load_lm_recipe, train_lm

    recipe = load_lm_recipe(args.config, args.overrides)
    final = train_lm(recipe, resume=args.resume)
    print(f"pipeline saved to {final}")


def _pretokenize(args: argparse.Namespace) -> None:
    from .pretokenize import pretokenize
    from .train_lm import load_lm_recipe

    recipe = load_lm_recipe(args.config, args.overrides)
    print(pretokenize(recipe.data).summary())


def _reconstruct(args: argparse.Namespace) -> None:
    from .codec import reconstruct_files

    result = reconstruct_files(args.model, args.inputs, args.out, batch_size=args.batch_size)
    print(result.summary())


def _encode(args: argparse.Namespace) -> None:
    from .codec import encode_files

    result = encode_files(args.model, args.inputs, args.out, batch_size=args.batch_size)
    print(result.summary())


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (configs/...)")
    p.add_argument(
        "--resume",
        default=None,
        help="'latest' (newest checkpoint of the run, if any) or a checkpoint folder",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vqgpt", description="VQ-VAE image tokenizer + GPT-2 over text and image tokens"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {}

    p = sub.add_parser("train-tokenizer", help="stage one: train the VQ-VAE image tokenizer")
    _add_train_args(p)
    commands["train-tokenizer"] = _train_tokenizer

    p = sub.add_parser("pretokenize", help="encode a dataset's images once (the LM recipe's data)")
    p.add_argument("--config", required=True, help="LM recipe YAML (configs/lm/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=128")
    commands["pretokenize"] = _pretokenize

    p = sub.add_parser("train-lm", help="stage two: train the GPT-2 over text + image tokens")
    _add_train_args(p)
    commands["train-lm"] = _train_lm

    for name, fn, helptext, out_help in (
        ("reconstruct", _reconstruct, "images -> tokens -> images", "output folder"),
        ("encode", _encode, "images -> code ids (JSON lines)", "output .jsonl (default stdout)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="a run folder or its final/ folder")
        p.add_argument("inputs", nargs="+", help="image files or folders")
        p.add_argument("--out", required=name == "reconstruct", default=None, help=out_help)
        p.add_argument("--batch-size", type=int, default=32)
        commands[name] = fn

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vqgpt` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args._commands[args.command](args)
    except (FileNotFoundError, ValueError) as err:
        # user errors (bad config key, missing file, mismatched parts): one clear line, no trace
        print(f"vqgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
