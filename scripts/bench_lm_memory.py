"""Benchmark: resident memory of the LM data path (ExampleBank + build_epoch) against corpus size.

    python scripts/bench_lm_memory.py               # 10,000 and 500,000 rows, 200 micro-batches
    python scripts/bench_lm_memory.py --quick       # 1,000 and 10,000 rows, 10 micro-batches

Writes synthetic pretokenized codes (`write_codes`: random int16 codes of the demo's 8x8 grid,
K = 1024, captions of a few words) in the on-disk form `vqgpt pretokenize` writes, then, per
size, in a fresh subprocess: imports, opens the bank (`ExampleBank` over `ArrowRows(codes_files(...))`, the real
GPT-2 BPE), builds epoch 0 with the lm/shapes sequences (max_length 88, no packing, t2i prefix
20; batch 47) and iterates the first micro-batches. Reports VmRSS once ready (imports done, tokenizer built), after
opening the bank and after the batches, split into anonymous memory (RssAnon: what the process
allocated) and mapped file pages (RssFile: shared libraries, and the pages of the memory-mapped
Arrow files that opening and reading touched; page cache the kernel can drop at any time, at
most the Arrow files' size), the peak (ru_maxrss, both kinds), and the difference between sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = (8, 8)
CODEBOOK_SIZE = 1024
WORDS = "a the red green blue yellow circle square triangle small large left right of above below"


def write_codes(output_dir: Path, split: str, rows: int, seed: int = 0) -> Path:
    """A finished pretokenized split of `rows` random rows at <output_dir>/<split>/ (what
    `load_codes` opens): the `codes` Array2D int16 column, `text`, and the split's marker."""
    import datasets
    import numpy as np

    from vqgpt.data.sources import SkipStats
    from vqgpt.files import write_text
    from vqgpt.lm.pretokenize import MARKER, SplitInfo, chunk_name, codes_dtype

    rng = np.random.default_rng(seed)
    dtype = codes_dtype(CODEBOOK_SIZE)
    words = np.array(WORDS.split())
    features = datasets.Features(
        {"codes": datasets.Array2D(GRID, str(dtype)), "text": datasets.Value("string")}
    )

    chunk_rows = 10_000  # pretokenize's default
    final = Path(output_dir) / split
    names, kept = [], []
    for start in range(0, rows, chunk_rows):  # the chunk layout pretokenize writes
        n = min(chunk_rows, rows - start)
        codes = rng.integers(0, CODEBOOK_SIZE, (n, *GRID), dtype=dtype)
        texts = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(n)]
        chunk = datasets.Dataset.from_dict({"codes": codes, "text": texts}, features=features)
        names.append(chunk_name(len(names)))
        kept.append(n)
        chunk.save_to_disk(str(final / names[-1]))
    info = SplitInfo(
        split=split,
        rows=rows,
        skipped=SkipStats(),
        grid=list(GRID),
        codebook_size=CODEBOOK_SIZE,
        tokenizer="synthetic",
        tokenizer_fingerprint="synthetic",
        source={"synthetic": rows, "seed": seed},
        chunk_rows=chunk_rows,
        source_rows=rows,
        chunks=names,
        chunk_rows_kept=kept,
    )
    write_text(final / MARKER, info.to_json())
    return final


def _memory() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile (MiB) of this process, and its peak (ru_maxrss)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    fields["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return fields


def measure(output_dir: Path, micro_batches: int) -> dict:
    """Child: open the bank, iterate `micro_batches` of epoch 0; memory at each point."""
    from vqgpt.lm.arrow_rows import ArrowRows
    from vqgpt.lm.batches import ExampleBank, build_epoch
    from vqgpt.lm.pretokenize import codes_files
    from vqgpt.lm.sequences import SequenceConfig
    from vqgpt.lm.vocab import JointTokenizer

    tokenizer = JointTokenizer.build(CODEBOOK_SIZE, GRID)
    out = {"ready": _memory()}  # imports done, tokenizer built
    start = time.perf_counter()
    bank = ExampleBank(ArrowRows(codes_files(output_dir, "train")), tokenizer, output_dir)
    out["load"] = _memory()
    seq = SequenceConfig(max_length=88, pack=False, t2i_prefix_length=20, t2i_ratio=0.5)
    done = tokens = 0
    for batch in build_epoch(bank, seq, epoch=0, batch_size=47, rank=0, world=1):
        tokens += int(batch["attention_mask"].sum())
        done += 1
        if done == micro_batches:
            break
    out["batches"] = _memory()
    arrow = sum(Path(f).stat().st_size for f in bank.rows.files)
    out.update(rows=len(bank), micro_batches=done, tokens=tokens, arrow_mib=arrow / 2**20)
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # a pretokenized folder
    parser.add_argument("--micro-batches", type=int, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    batches = 10 if args.quick else 200
    if args.child:
        print(json.dumps(measure(args.child, args.micro_batches)))
        return
    sizes = [1_000, 10_000] if args.quick else [10_000, 500_000]
    import datasets

    datasets.disable_progress_bars()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lm_memory_") as tmp:
        for rows in sizes:
            folder = Path(tmp) / f"rows{rows}"
            write_codes(folder, "train", rows)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(folder),
                "--micro-batches",
                str(batches),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(results, batches))


def table(results: list[dict], micro_batches: int) -> str:
    """The markdown table of `measure` results, one row per size and the last minus the first."""
    lines = [
        f"LM data path memory: {micro_batches} micro-batches of 47 x 88 tokens (lm/shapes "
        f"sequences), grid {GRID[0]}x{GRID[1]}, K={CODEBOOK_SIZE}; MiB\n",
        "| rows | Arrow files | RSS ready | RSS load (anon / file) | RSS batches (anon / file) "
        "| peak | s |",
        "|---|---|---|---|---|---|---|",
    ]

    def split(m: dict) -> str:
        return f"{m['VmRSS']:.1f} ({m['RssAnon']:.1f} / {m['RssFile']:.1f})"

    def row(label: str, r: dict) -> str:
        cells = [label, f"{r['arrow_mib']:.1f}", f"{r['ready']['VmRSS']:.1f}"]
        cells += [split(r["load"]), split(r["batches"])]
        cells += [f"{r['batches']['peak']:.1f}", f"{r['seconds']:.1f}"]
        return "| " + " | ".join(cells) + " |"

    lines += [row(f"{r['rows']:,}", r) for r in results]
    first, last = results[0], results[-1]
    delta: dict = {
        stage: {k: last[stage][k] - first[stage][k] for k in first[stage]}
        for stage in ("ready", "load", "batches")
    }
    for key in ("seconds", "arrow_mib"):
        delta[key] = last[key] - first[key]
    lines.append(row(f"{last['rows']:,} - {first['rows']:,}", delta))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
