"""The `vqgpt` command line: each subcommand parses, loads a config, calls one function.

Data (JSON lines of `encode` and `caption`, the report of `eval`) goes to stdout, messages
(counts, skipped inputs, "saved to") to stderr, so `vqgpt encode x.png > codes.jsonl` holds only
records. A command that produced nothing exits 2 with one line saying why; some inputs skipped is
still a success, with the skips on stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

from vqgpt.errors import VqgptError


def _say(line: str) -> None:
    """A message on stderr, once per launch: on the first process only (`RANK` is set by
    `accelerate launch`)."""
    if os.environ.get("RANK", "0") == "0":
        _note(line)


def _note(text: str) -> None:
    """A message (not data): stderr."""
    print(text, file=sys.stderr)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from vqgpt.tokenizer.train import load_recipe, train_tokenizer

    recipe = load_recipe(args.config, args.overrides)
    final = train_tokenizer(recipe, resume=args.resume)
    _say(f"tokenizer saved to {final}")


def _train_lm(args: argparse.Namespace) -> None:
    from vqgpt.lm.train import load_lm_recipe, train_lm

    recipe = load_lm_recipe(args.config, args.overrides)
    final = train_lm(recipe, resume=args.resume)
    _say(f"pipeline saved to {final}")


def _pretokenize(args: argparse.Namespace) -> None:
    from vqgpt.distributed import process_state
    from vqgpt.lm.pretokenize import pretokenize
    from vqgpt.lm.train import load_lm_recipe

    recipe = load_lm_recipe(args.config, args.overrides)
    result = pretokenize(recipe.data)
    if process_state().is_main_process:  # under `accelerate launch`: one summary
        _note(result.summary())


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """{field: args.<attr>} for the options given on the command line (left out: None)."""
    return {k: getattr(args, a) for k, a in fields.items() if getattr(args, a) is not None}


SAMPLING_OPTIONS = dict(temperature="temperature", top_k="top_k", top_p="top_p", seed="seed")


def generate_sampling(args: argparse.Namespace):  # -> SamplingConfig
    """`vqgpt generate`'s sampling: the options given, vqgpt's defaults for the rest."""
    from vqgpt.lm.sampling import SamplingConfig

    given = _given(args, cfg_scale="cfg", rerank="rerank", **SAMPLING_OPTIONS)
    return SamplingConfig(**given, do_sample=not args.greedy)


def caption_sampling(args: argparse.Namespace):  # -> SamplingConfig
    """`vqgpt caption`'s sampling: greedy unless --sample, vqgpt's defaults for the rest."""
    from vqgpt.lm.sampling import SamplingConfig

    options = dict(num_beams="beams", max_new_tokens="max_new_tokens", rerank="rerank")
    return SamplingConfig(**_given(args, **options, **SAMPLING_OPTIONS), do_sample=args.sample)


def eval_config(args: argparse.Namespace):  # -> PipelineEvalConfig
    """`vqgpt eval`'s scoring: the options given, PipelineEvalConfig's defaults for the rest."""
    from vqgpt.eval.pipeline import PipelineEvalConfig

    given = _given(
        args,
        num_images="num_images",
        temperature="temperature",
        top_k="top_k",
        rerank="rerank",
        caption_rerank="caption_rerank",
        seed="seed",
    )
    if args.cfg is not None:
        given["cfg_scales"] = (1.0, args.cfg)
    return PipelineEvalConfig(**given)


def _generate(args: argparse.Namespace) -> None:
    from vqgpt.lm.infer import generate_to_folder, read_prompts

    if args.document:
        return _continue_documents(args)
    sized = "images take h*w tokens each"
    only_documents = [
        ("--max-new-tokens", args.max_new_tokens, sized),
        ("--max-images", args.max_images, sized),
        (
            "--cfg-unconditional",
            args.cfg_unconditional,
            "a caption's CFG branch is the caption dropped",
        ),
    ]
    for option, value, why in only_documents:
        if value is not None:
            raise ValueError(f"{option} is for --document; {why}")
    prompts = read_prompts(args.prompts, args.prompts_file)
    blank = sum(not p.strip() for p in args.prompts)
    if blank:
        _note(f"{blank} blank prompt(s) left out")
    n = 4 if args.n is None else args.n
    result = generate_to_folder(args.model, prompts, n, generate_sampling(args), args.out)
    _note(result.summary())


def _continue_documents(args: argparse.Namespace) -> None:
    """`vqgpt generate --document`: continue documents instead of drawing images for captions."""
    from vqgpt.lm.infer import continue_to_folder, read_documents

    given = [("captions", args.prompts), ("--prompts", args.prompts_file), ("-n", args.n)]
    given.append(("--rerank", args.rerank))
    clash = [name for name, value in given if value]
    if clash:
        raise ValueError(f"--document continues documents: leave out {', '.join(clash)}")
    prompts = read_documents(args.document)
    limits = _given(
        args,
        max_new_tokens="max_new_tokens",
        max_images="max_images",
        unconditional="cfg_unconditional",
    )
    result = continue_to_folder(args.model, prompts, generate_sampling(args), args.out, **limits)
    _note(result.summary())


def _caption(args: argparse.Namespace) -> None:
    from vqgpt.lm.infer import caption_files

    result = caption_files(args.model, args.inputs, caption_sampling(args), args.out)
    _note(result.summary())


# vqgpt.lm.continuation.UNCONDITIONAL_BRANCHES, spelt out here so that --help needs no torch import
UNCONDITIONAL_CHOICES = ("caption_dropped", "previous_image")
CFG_UNCONDITIONAL_HELP = (
    "--document: the CFG branch an image is guided against: caption_dropped (default: the "
    "image with no text before it) or previous_image (the document up to its last image, so "
    "guidance pushes by the text written since; InstructPix2Pix's text guidance)"
)


RERANK_HELP = (
    "draw N images per output and keep the one whose caption the model finds most likely "
    "(self-reranking; N times the sampling time; 1 = off)"
)


CAPTION_RERANK_HELP = (
    "decode a caption plus N-1 sampled ones (at --temperature) and keep the best by "
    "log p(caption | image) + log p(image | caption) (1 = off)"
)


# Sampling options have no default here: what is left out takes vqgpt's one set of defaults
DEFAULTS_EPILOG = (
    "Options left out take vqgpt's sampling defaults; print them with: python -c \"from "
    'vqgpt.lm.sampling import SamplingConfig; print(SamplingConfig())"'
)


INPUTS_EPILOG = (
    "Folders are searched for image files; a file given twice is done once. Files that cannot "
    "be read are skipped, with the reason on stderr (too large: raise the limit with "
    "VQGPT_MAX_IMAGE_PIXELS); none readable exits 2."
)

RECON_EPILOG = INPUTS_EPILOG + (
    " Output names: the input's file name, suffix kept, + '_recon.png' (twin.png -> "
    "twin.png_recon.png, twin.bmp -> twin.bmp_recon.png); a file name met again (the same name "
    "in two folders) gets -2, -3, ... in input order (twin.png_recon-2.png). index.json maps "
    "each input to its output and lists the skipped inputs."
)

RECON_OUT_HELP = (
    "output folder (new, or without files of these names: existing files are never replaced)"
)

ENCODE_OUT_HELP = "output .jsonl, replaced if it exists (default: stdout)"

GENERATE_OUT_HELP = (
    "output folder: <prompt#>_<sample#>.png, prompts.jsonl (file -> prompt), grid.png; existing "
    "files of these names are never replaced"
)


DOCUMENT_HELP = (
    "continue a document instead (repeatable): a .jsonl file (one document a line, "
    '{"segments": [{"text": ...}, {"image": "a.png"}]}, paths relative to the file), another '
    "text file, or the text itself; writes document.md (000.md, ... for several) with the PNGs "
    "inline and documents.jsonl (segments, token counts, why it stopped)"
)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--seed", type=int, default=None)


def _demo(args: argparse.Namespace) -> None:
    from vqgpt.demo import DEMO_CONFIGS, load_demo_config, run_demo

    path = args.config or DEMO_CONFIGS["quick" if args.quick else "full"]
    given = {"output_dir": args.out, "eval.num_images": args.eval_images}
    overrides = [f"{k}={v}" for k, v in given.items() if v is not None]
    run_demo(load_demo_config(path, [*overrides, *args.overrides]))


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vqgpt.config import from_dict
    from vqgpt.data.images import OutputExistsError
    from vqgpt.data.sources import DataConfig
    from vqgpt.eval.report import write_report
    from vqgpt.files import read_text
    from vqgpt.lm.pipeline import Pipeline

    out, data_dir = Path(args.out).resolve(), Path(args.data).resolve()
    if Path(args.data).is_dir() and (out == data_dir or data_dir in out.parents):
        raise OutputExistsError(
            f"--out {args.out} is inside --data {args.data}: the report's images would replace "
            "or join the data; give --out a folder outside it"
        )
    pipe = Pipeline.from_pretrained(args.model)
    size = pipe.image_tokenizer.config.arch.image_size
    data = from_dict(DataConfig, {"source": args.data, "image_size": size})
    folder = write_report(pipe, data, Path(args.out), eval_config(args), runs={}, timings={})
    print(read_text(folder / "report.md"))


def _reconstruct(args: argparse.Namespace) -> None:
    from vqgpt.tokenizer.codec import reconstruct_files

    result = reconstruct_files(args.model, args.inputs, args.out, batch_size=args.batch_size)
    _note(result.summary())


def _encode(args: argparse.Namespace) -> None:
    from vqgpt.tokenizer.codec import encode_files

    result = encode_files(args.model, args.inputs, args.out, batch_size=args.batch_size)
    _note(result.summary())


def _export(args: argparse.Namespace) -> None:
    from vqgpt.export.folder import ExportConfig, PushError, export_run

    cfg = ExportConfig(
        run=args.run,
        out=args.out,
        push_to_hub=args.push_to_hub,
        private=args.private,
        revision=args.revision,
        metrics=args.metrics,
    )
    try:
        result = export_run(cfg)
    except PushError as err:
        print(f"vqgpt export: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    _note(f"exported to {result.folder}" + (f", pushed to {result.url}" if result.url else ""))


def _app(args: argparse.Namespace) -> None:
    from vqgpt.app.serve import AppConfig, serve

    serve(AppConfig(args.model, args.host, args.port, args.concurrency))


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

    for name, fn, helptext, out_help, epilog in (
        ("reconstruct", _reconstruct, "images -> tokens -> images", RECON_OUT_HELP, RECON_EPILOG),
        ("encode", _encode, "images -> code ids (JSON lines)", ENCODE_OUT_HELP, INPUTS_EPILOG),
    ):
        p = sub.add_parser(name, help=helptext, epilog=epilog)
        p.add_argument("--model", required=True, help="a run folder or its final/ folder")
        p.add_argument("inputs", nargs="+", help="image files or folders")
        p.add_argument("--out", required=name == "reconstruct", default=None, help=out_help)
        p.add_argument("--batch-size", type=int, default=32)
        commands[name] = fn

    p = sub.add_parser(
        "generate", help="captions -> images (text-to-image)", epilog=DEFAULTS_EPILOG
    )
    p.add_argument("--model", required=True, help="an LM run folder or its final/ folder")
    p.add_argument("prompts", nargs="*", help="captions")
    p.add_argument("--prompts", dest="prompts_file", default=None, help="file, one caption a line")
    p.add_argument("-n", type=int, default=None, help="images per prompt (default 4)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (1 = off)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--rerank", type=int, default=None, help=RERANK_HELP)
    p.add_argument(
        "--document",
        action="append",
        default=None,
        metavar="FILE|TEXT",
        help=DOCUMENT_HELP,
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="--document: new tokens (default 256)"
    )
    p.add_argument(
        "--max-images", type=int, default=None, help="--document: images at most (default 4)"
    )
    p.add_argument(
        "--cfg-unconditional",
        choices=UNCONDITIONAL_CHOICES,
        default=None,
        help=CFG_UNCONDITIONAL_HELP,
    )
    p.add_argument("--out", required=True, help=GENERATE_OUT_HELP)
    _add_sampling_args(p)
    commands["generate"] = _generate

    p = sub.add_parser(
        "caption", help="images -> captions", epilog=INPUTS_EPILOG + " " + DEFAULTS_EPILOG
    )
    p.add_argument("--model", required=True, help="an LM run folder or its final/ folder")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--beams", type=int, default=None, help="beam search width (1 = greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="caption length limit; above the model's room (n_positions - h*w - 4) it is capped, "
        "with a note",
    )
    p.add_argument("--rerank", type=int, default=None, help=CAPTION_RERANK_HELP)
    p.add_argument(
        "--out",
        default=None,
        help='write the JSON lines {"file", "caption"} here instead of stdout (replaced if it '
        "exists)",
    )
    _add_sampling_args(p)
    commands["caption"] = _caption

    p = sub.add_parser(
        "eval",
        help="held-out captioning and text-to-image scores of a pipeline",
        epilog="Options left out take the defaults of vqgpt.eval.pipeline.PipelineEvalConfig "
        "(its sampling ones are vqgpt's sampling defaults, SamplingConfig's).",
    )
    p.add_argument("--model", required=True, help="an LM run folder or its final/ folder")
    p.add_argument("--data", default="shapes", help="'shapes' or an image folder with a test split")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale scored beside 1.0")
    p.add_argument("--temperature", type=float, default=None, help="text-to-image sampling")
    p.add_argument("--top-k", type=int, default=None, help="text-to-image sampling (0 = off)")
    p.add_argument(
        "--rerank", type=int, default=None, help="also score --cfg as best of N (1 = off)"
    )
    p.add_argument("--seed", type=int, default=None, help="text-to-image sampling seed")
    p.add_argument(
        "--caption-rerank", type=int, default=None, help="also score captions reranked from N"
    )
    p.add_argument(
        "--out",
        required=True,
        help="folder for metrics.json, report.md and grids (an earlier eval's are replaced)",
    )
    commands["eval"] = _eval

    p = sub.add_parser("export", help="a run -> a Hugging Face Hub folder (loads without vqgpt)")
    p.add_argument("--run", required=True, help="an LM or tokenizer run folder, or its final/")
    p.add_argument("--out", required=True, help="export folder (an earlier export is replaced)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload it there")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--metrics", default=None, help="`vqgpt eval` metrics.json for the card")
    commands["export"] = _export

    p = sub.add_parser(
        "app",
        help='the web app: text to image, captions, tokens (needs pip install "vqgpt[app]")',
    )
    p.add_argument(
        "--model", required=True, help="an LM run folder, its final/, an export folder or Hub id"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--concurrency", type=int, default=2, help="requests decoded at once (the rest queue)"
    )
    commands["app"] = _app

    p = sub.add_parser("demo", help="the whole pipeline on the built-in shapes, with a report")
    p.add_argument("--out", default=None, help="output folder (reused by a second run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in minutes")
    p.add_argument("--eval-images", type=int, default=None, help="held-out images scored")
    p.add_argument(
        "--config",
        default=None,
        help="a demo config (default: the packaged demo/full.yaml or demo/quick.yaml; print "
        "their paths with python -m vqgpt.recipes). Its tokenizer_recipe and lm_recipe are "
        "files relative to its folder when such files exist, else packaged recipes "
        "(tokenizer/shapes), so a copy edited in any folder works",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.rerank=8")
    commands["demo"] = _demo

    parser.set_defaults(_commands=commands)
    return parser


def _one_line_notes(command: str) -> None:
    """vqgpt's own warnings (a capped max_new_tokens, ...) as one stderr line each."""
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        if f"{os.sep}vqgpt{os.sep}" in filename:
            return f"vqgpt {command}: note: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vqgpt` console script."""
    # `kill -USR1 <pid>` prints every thread's stack: how a hung multi-process run shows where
    # each rank waits (the tests send it on a timeout)
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError):  # a stderr with no file descriptor (captured, in-process)
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_notes(args.command)
    try:
        args._commands[args.command](args)
    except (VqgptError, FileNotFoundError, ValueError) as err:
        # user errors (bad config key, missing or unreadable data, mismatched parts): one clear
        # line, no traceback
        print(f"vqgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    from vqgpt.distributed import leave_process_group

    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
