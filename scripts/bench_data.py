"""Benchmark: pretokenisation speed per input format and process count, and reading alone.

    python scripts/bench_data.py            # 2000 64x64 photo crops
    python scripts/bench_data.py --quick    # 200 (the smoke test)

Builds one corpus in a temporary folder (N crops of scikit-image's photos, `photos_dataset`) in
three formats: JPEG files + metadata.jsonl, 2 Parquet files (image bytes), 4 WebDataset tars
(key.jpg + key.txt); and an untrained image tokenizer of configs/tokenizer/photos.yaml's shape
(speed does not depend on training). Then, each in its own process (CPU, OMP_NUM_THREADS=1 per
process):

- pretokenize: `vqgpt.lm.pretokenize.pretokenize` of the corpus with 1 and 2 processes
  (`accelerate launch`, gloo), images/s over the call (loading included), and the peak RSS of the
  largest process (`ru_maxrss` of the row's process tree);
- reading alone: the same rows decoded and transformed (`read_image` + `ImageTransform`), no
  encoder, 1 process; and reading / encoding, the ratio of the two 1-process speeds.

Prints a Markdown table (the rows paste into docs/benchmarks.md). `load_corpus` is the one place
that turns a format's path into a dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

FORMATS = ("folder", "parquet", "webdataset")
STREAMED = "webdataset-stream"  # the WebDataset shards read as a stream (data.streaming: true)
PARQUET_FILES, TARS = 2, 4


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# the corpus and the tokenizer


def write_corpus(root: Path, n: int) -> dict[str, Path]:
    """N photo crops as an image folder, Parquet files and WebDataset tars; format -> path."""
    import datasets

    from vqgpt.data.sources import PhotosConfig, photos_dataset

    crops = photos_dataset(PhotosConfig(num_images=n, num_test_images=1), "train", 64)
    folder, parquet, wds = root / "folder", root / "parquet", root / "webdataset"
    for path in (folder, parquet, wds):
        path.mkdir(parents=True)
    names, jpegs, texts = [], [], []
    with (folder / "metadata.jsonl").open("w") as meta:
        for i, row in enumerate(crops):
            name = f"{i:06d}.jpg"
            row["image"].save(folder / name, quality=90)
            meta.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
            names.append(name)
            jpegs.append((folder / name).read_bytes())
            texts.append(row["text"])
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in jpegs], "text": texts},
        features=datasets.Features(image=datasets.Image(), text=datasets.Value("string")),
    )
    for k in range(PARQUET_FILES):
        table.shard(PARQUET_FILES, k, contiguous=True).to_parquet(parquet / f"part-{k}.parquet")
    per_tar = -(-n // TARS)
    for k in range(TARS):
        with tarfile.open(wds / f"shard-{k:05d}.tar", "w") as tar:
            for i in range(k * per_tar, min(n, (k + 1) * per_tar)):
                for suffix, data in ((".jpg", jpegs[i]), (".txt", texts[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"folder": folder, "parquet": parquet, "webdataset": wds}


def corpus_config(fmt: str, path: Path):  # -> DataConfig
    """The data section a user would write for the corpus in one format."""
    from vqgpt.data.sources import DataConfig

    streaming = fmt == STREAMED
    fmt = "webdataset" if streaming else fmt
    return DataConfig(source=str(path), format=fmt, image_size=64, streaming=streaming)


def load_corpus(fmt: str, path: Path):  # -> datasets.Dataset with image + text
    """The corpus in one format through vqgpt's one data entry point (`load_image_dataset`)."""
    from vqgpt.data.sources import load_image_dataset

    return load_image_dataset(corpus_config(fmt, path), "train")


def write_tokenizer(path: Path) -> Path:
    """An untrained VQ-VAE of configs/tokenizer/photos.yaml's shape, saved as a model folder."""
    import torch

    from vqgpt.recipes import packaged_recipe
    from vqgpt.tokenizer.train import load_recipe
    from vqgpt.tokenizer.vqvae import VQVAE, VQVAEConfig

    recipe = load_recipe(packaged_recipe("tokenizer/photos"))
    torch.manual_seed(0)
    VQVAE(VQVAEConfig.build(recipe.model, recipe.quantizer)).eval().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# the measured work, each in its own process


def run_pretokenize(fmt: str, corpus: Path, tokenizer: Path, out: Path) -> None:
    """pretokenize the corpus (under however many processes were launched); rows and seconds."""
    import vqgpt.lm.pretokenize as pretok
    from vqgpt.distributed import leave_process_group

    cfg = pretok.PretokenizeConfig(
        tokenizer=str(tokenizer),
        images=corpus_config(fmt, corpus),
        output_dir=str(out),
        splits=["train"],
        batch_size=64,
        chunk_rows=500,
    )
    start = time.perf_counter()
    result = pretok.pretokenize(cfg)
    seconds = time.perf_counter() - start
    if pretok.process_state().is_main_process:
        print(json.dumps({"rows": result.splits["train"].rows, "seconds": seconds}))
    sys.stdout.flush()
    leave_process_group()


def run_reading(fmt: str, corpus: Path) -> None:
    """Decode + transform every image of the corpus, no encoder; rows and seconds."""
    from vqgpt.data.images import ImageTransform, read_image
    from vqgpt.lm.pretokenize import _column_values

    start = time.perf_counter()
    ds = load_corpus(fmt, corpus)
    transform = ImageTransform(64)
    rows = 0
    if fmt == STREAMED:
        values = (row["image"] for row in ds)
    else:
        values = (value for _, value in _column_values(ds, range(len(ds)), 64))
    for value in values:
        image, _ = read_image(value)
        if image is not None:
            transform(image)
            rows += 1
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))


def measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd` under a fresh process that reports its tree's peak RSS; its JSON + rss_mb."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(out.stderr[-3000:] if out.returncode else '')\n"
        "line = [ln for ln in out.stdout.splitlines() if ln.startswith('{')][-1]\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({**json.loads(line), 'rss_mb': rss}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env=env)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "--main_process_port", free_port()]  # fmt: skip


def bench(n: int, work: Path) -> list[dict]:
    """Every row of the table, measured."""
    corpus = write_corpus(work / "corpus", n)
    tokenizer = write_tokenizer(work / "tokenizer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(work / "hf_cache"), "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    os.environ.update(env)
    for fmt in FORMATS:  # the Arrow conversion of Parquet / tars, once, outside the timings
        load_corpus(fmt, corpus[fmt])
    rows = []
    script = str(Path(__file__).resolve())
    corpus[STREAMED] = corpus["webdataset"]
    for fmt in (*FORMATS, STREAMED):
        read = measured([sys.executable, script, "--work", "read", fmt, str(corpus[fmt])], env)
        for processes in (1, 2):
            out = work / f"codes-{fmt}-{processes}"
            cmd = [*launch(processes), script, "--work", "pretokenize", fmt, str(corpus[fmt]),
                   str(tokenizer), str(out)]  # fmt: skip
            rows.append({"format": fmt, "processes": processes, "read": read,
                         **measured(cmd, env)})  # fmt: skip
    return rows


def table(rows: list[dict], n: int) -> str:
    lines = [
        f"{n} images, 64x64 JPEG; tokenizer: configs/tokenizer/photos.yaml's shape, untrained; "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS=1 per process",
        "",
        "| format | processes | pretokenize images/s | peak RSS / process (MB) | reading alone "
        "images/s | reading / encoding |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = r["rows"] / r["seconds"]
        read = r["read"]["rows"] / r["read"]["seconds"]
        ratio = f"{read / speed:.1f}x" if r["processes"] == 1 else ""
        lines.append(
            f"| {r['format']} | {r['processes']} | {speed:,.0f} | {r['rss_mb']:,.0f} | "
            f"{read:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 images")
    parser.add_argument("--work", nargs="+", help=argparse.SUPPRESS)  # one measured piece
    args = parser.parse_args()
    if args.work:
        kind, fmt, corpus, *rest = args.work
        if kind == "read":
            run_reading(fmt, Path(corpus))
        else:
            run_pretokenize(fmt, Path(corpus), Path(rest[0]), Path(rest[1]))
        return
    n = 200 if args.quick else args.num_images
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows = bench(n, Path(tmp))
    print(table(rows, n))


if __name__ == "__main__":
    main()
