"""Tests for the benchmark scripts in scripts/: their parts and real --quick runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from vqgpt.lm.model import LM_PRESETS, flops_per_token, round_up
from vqgpt.lm.vocab import VocabLayout


@pytest.fixture(scope="module")
def bench(load_script):
    """scripts/bench_lm.py as a module."""
    return load_script("bench_lm")


@pytest.mark.parametrize(
    "device, compile_, bf16, n_rows",
    [
        ("cpu", False, False, 4),
        ("cpu", True, False, 7),
        ("cpu", False, True, 7),
        ("cuda", False, False, 5),
        ("cuda", True, False, 9),
    ],
)
def test_plan_rows(bench, device, compile_, bf16, n_rows):
    rows = bench.plan_rows(device, compile_, bf16)
    assert len(rows) == n_rows
    assert [r.name for r in rows[:3]] == ["plain HF", "shipped full", "shipped split"]
    assert rows[0].path == "plain" and not rows[0].compile
    with_bf16 = device == "cuda" or bf16
    kept = [r for r in rows[1:] if r.keep_freed_memory]  # the shipped rows as train_lm runs them
    assert sum(r.precision == "bf16" for r in kept) == (2 + 2 * compile_ if with_bf16 else 0)
    assert sum(r.compile for r in kept) == len(kept) // 2 * compile_  # one per row when asked
    assert all(r.path == "shipped" for r in rows if r.compile)
    default_malloc = [r for r in rows if not r.keep_freed_memory]
    # on a CPU each split row again with glibc's default thresholds; a GPU run has none
    assert [r.name for r in default_malloc] == (
        [f"{r.name}, default malloc" for r in kept if r.loss == "split"] if device == "cpu" else []
    )


@pytest.mark.parametrize("fraction", [0.0, 0.75, 1.0])
def test_make_batch_id_ranges(bench, fraction):
    batch, seq_len, k = 3, 41, 32
    ids = bench.make_batch(batch, seq_len, k, fraction, seed=0)
    image_offset = 50257 + 2
    assert ids.shape == (batch, seq_len)
    assert (ids[:, 0] == 50256).all()
    is_image = ids[:, 1:] >= image_offset
    assert (is_image.sum(1) == round(fraction * (seq_len - 1))).all()
    assert (ids < image_offset + k).all() and (ids >= 0).all()
    # image codes come last: once a row reaches them it stays there
    assert (is_image[:, 1:].int() >= is_image[:, :-1].int()).all()
    assert (bench.make_batch(batch, seq_len, k, fraction, seed=0) == ids).all()


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| row")]
    return {
        cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)
    }


def _script_stdout(python_forked, script: Path, *args) -> str:
    """stdout of `python script args...` in a forked interpreter (fails on a non-zero exit)."""
    python, env = python_forked()
    cmd = [*python, str(script), *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, check=True, timeout=300
    ).stdout


def test_shapes_ceiling_script_tables_every_size_and_shape(
    tiny_tokenizer_run, tmp_path, python_forked, repo_root
):
    from vqgpt.data.shapes import ShapesConfig, shapes_dataset, write_image_folder

    folder = write_image_folder(
        shapes_dataset(ShapesConfig(num_images=1, num_test_images=40, image_size=32), "test"),
        tmp_path / "test",
    )
    script = repo_root / "scripts" / "shapes_ceiling.py"
    out = _script_stdout(
        python_forked,
        script,
        "--tokenizer",
        tiny_tokenizer_run,
        "--data",
        folder,
        "--num-images",
        40,
    )
    assert "all objects right: originals 100.0%" in out and "(40 images)" in out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| small") or line.startswith("| large")
    ]
    assert rows and sum(int(r.split("|")[3].split("/")[1].split()[0]) for r in rows) >= 40


def test_photos_per_photo_script_tables_each_photograph_of_both_splits(
    tiny_tokenizer_run, python_forked, repo_root
):
    pytest.importorskip("skimage")
    from vqgpt.data.sources import TEST_PHOTOS, TRAIN_PHOTOS

    script = repo_root / "scripts" / "photos_per_photo.py"
    for extra in ([], ["--bypass"]):  # 44 crops: every photo of both splits alike
        out = _script_stdout(python_forked, script, tiny_tokenizer_run, "--num-images", 44, *extra)
        rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines()]
        for split, names in (("train", TRAIN_PHOTOS), ("test", TEST_PHOTOS)):
            mine = {r[1]: float(r[2]) for r in rows if r[0] == split and not r[1].startswith("**")}
            assert set(mine) == set(names)
            (overall,) = [float(r[2].strip("*")) for r in rows if r[0] == split and "all" in r[1]]
            # equal crops per photo: the split's mean is the mean of the photos' means
            assert abs(sum(mine.values()) / len(mine) - overall) < 0.01


# ---------------------------------------------------------------------------------------------
# scripts/bench_gpu.sh (nearest code, bench_lm.py, bench_sampling.py) in its CPU mode


def _rows(section: str) -> list[list[str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]  # no header


@pytest.mark.slow
def test_bench_gpu_quick_prints_every_table(cli_env, repo_root):
    """~40 s: the three benchmarks at toy sizes; the fast sampler and the kernel agree. New
    Pythons, not the CLI server's forks: the nearest-code script sets TRITON_INTERPRET=1, which
    Triton reads when it is imported (the server has imported it)."""
    script = repo_root / "scripts" / "bench_gpu.sh"
    env = dict(cli_env(), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(script), "--quick"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parts = result.stdout.split("## ")
    assert [p.splitlines()[0] for p in parts[1:]] == [
        "nearest-code search",
        "GPT-2 training step",
        "text-to-image sampling",
    ]
    nearest, lm, sampling = (_rows(p) for p in parts[1:])
    assert [r[4] for r in nearest] == ["full", "chunked", "triton", "triton-fast"] * 2
    assert all(r[-2] == r[-1] == "100.000%" for r in nearest)  # = chunked, = full
    # on a CPU (the quick run here) the split row again with glibc's default allocator thresholds
    assert [r[0] for r in lm] == ["plain HF", "shipped full", "shipped split"] + (
        [] if torch.cuda.is_available() else ["shipped split, default malloc"]
    )
    _check_lm_section(parts[2])
    assert [(r[0], r[1]) for r in sampling] == [
        (n, m) for n in ("1", "4") for m in ("HF generate", "vqgpt plain", "vqgpt fast")
    ]
    assert all(float(r[2]) > 0 for r in sampling)
    fast = [r for r in sampling if r[1] == "vqgpt fast"]
    assert all(r[-1] == "100% images, 100.00% tokens" for r in fast)


def _check_lm_section(out: str) -> None:
    """bench_lm.py --quick --device cpu --seq-len 48 --peak-tflops 1 (bench_gpu.sh --quick's
    GPT-2 step): the three heads, their losses, the split head's FLOP share."""
    seq_len, k = 48, 256
    assert "peak for MFU: --peak-tflops 1" in out
    assert f"T={seq_len}" in out and f"K={k}" in out
    table = _table(out)
    assert list(table)[:3] == ["plain HF", "shipped full", "shipped split"]
    loss = {name: float(cells[-1]) for name, cells in table.items()}
    if "shipped split, default malloc" in table:  # the allocator changes no number
        assert loss["shipped split, default malloc"] == loss["shipped split"]
    assert loss["shipped full"] == pytest.approx(loss["plain HF"], rel=1e-4)
    assert "-> agree" in out
    # split normalises each target over a subset of the rows: a strictly smaller softmax sum
    assert loss["shipped split"] < loss["shipped full"]
    # the split head's share: text targets over 50259 rows, image targets over K of the 50560
    n_image = round(0.75 * (seq_len - 1))
    share = (
        ((seq_len - 1 - n_image) * 50259 + n_image * k) / (seq_len - 1) / round_up(50259 + k, 64)
    )
    assert f"the split head does {100 * share:.0f}% of its FLOPs" in out
    # MFU = tokens/s x FLOPs per token / the peak given (1 TFLOP/s)
    config = GPT2Config(vocab_size=round_up(50259 + k, 64), **LM_PRESETS["tiny"])
    flops = flops_per_token(config, seq_len)
    for name in ("shipped full", "shipped split"):
        tokens_per_s = float(table[name][5].replace(",", ""))
        mfu = float(table[name][7].rstrip("%")) / 100
        assert tokens_per_s > 0
        assert mfu == pytest.approx(tokens_per_s * flops / 1e12, rel=0.02, abs=1e-4)


def test_bench_gpu_rejects_unknown_arguments(repo_root):
    result = subprocess.run(
        ["bash", str(repo_root / "scripts" / "bench_gpu.sh"), "--fast"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "usage" in result.stderr


def test_bench_sampling_hf_baseline_draws_image_codes(tiny_gpt2, load_script):
    """The HF `generate` baseline (its CFG, our image-only processor): h*w codes in [0, K)."""
    bench = load_script("bench_sampling")
    layout = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
    model = tiny_gpt2(layout)
    captions = [[5, 17, 3], [], [42], [7, 7, 7, 7, 7, 1]]
    prompts = [[layout.eos_id, *c, layout.boi_id] for c in captions]
    codes = bench.hf_generate(model, layout, prompts, seed=0)
    assert codes.shape == (len(captions), layout.tokens_per_image)
    assert ((codes >= 0) & (codes < layout.codebook_size)).all()


# ---------------------------------------------------------------------------------------------
# scripts/bench_data.py: the corpus in three formats reads back the same rows


def test_bench_data_corpus_reads_the_same_rows_in_every_format(load_script, tmp_path, monkeypatch):
    bench = load_script("bench_data")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    corpus = bench.write_corpus(tmp_path / "corpus", 10)
    assert len(list(corpus["parquet"].glob("*.parquet"))) == 2
    assert len(list(corpus["webdataset"].glob("*.tar"))) == 4
    from vqgpt.data.images import read_image

    read = {}
    for fmt in bench.FORMATS:
        ds = bench.load_corpus(fmt, corpus[fmt])
        assert ds.column_names[:2] == ["image", "text"] and len(ds) == 10, fmt
        images = [read_image(v).image for v in ds.cast_column("image", _no_decode())["image"]]
        read[fmt] = (ds["text"], [im.tobytes() for im in images])
    assert read["parquet"] == read["folder"] == read["webdataset"]  # same JPEGs, same order
    row = {"format": "folder", "processes": 1, "rows": 10, "seconds": 2.0, "rss_mb": 600.0}
    out = bench.table([{**row, "read": {"rows": 10, "seconds": 0.5}}], 10)
    assert out.splitlines()[-1] == "| folder | 1 | 5 | 600 | 20 | 4.0x |"


def _no_decode():
    import datasets

    return datasets.Image(decode=False)


# ---------------------------------------------------------------------------------------------
# scripts/bench_lm_memory.py


def test_bench_lm_memory_measures_each_size_and_tables_the_difference(load_script, tmp_path):
    """The benchmark's parts in this process (its CLI runs each size in a fresh one): synthetic
    splits load_codes accepts, the batches iterated, one table row per size and the difference."""
    bench = load_script("bench_lm_memory")
    results = []
    for rows in (300, 3000):
        bench.write_codes(tmp_path / str(rows), "train", rows)
        results.append(bench.measure(tmp_path / str(rows), micro_batches=3))
    assert [(r["rows"], r["micro_batches"]) for r in results] == [(300, 3), (3000, 3)]
    assert all(r["tokens"] > 3 * 47 * (64 + 4) for r in results)  # every row holds an image
    table = bench.table(results, 3)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["rows", "300", "3,000", "3,000 - 300"]
    peak = [float(ln.split("|")[6]) for ln in lines[1:]]
    assert peak[2] == pytest.approx(peak[1] - peak[0], abs=0.11) and peak[0] > 0


# ---------------------------------------------------------------------------------------------
# scripts/bench_tokenizers.py: the quantizer families side by side, beside the peer's


@pytest.fixture(scope="module")
def bench_tokenizers(load_script):
    """scripts/bench_tokenizers.py as a module."""
    return load_script("bench_tokenizers")


@pytest.mark.parametrize("k", [64, 1024])
def test_bench_tokenizers_variants_are_valid_configs_of_k_codes(bench_tokenizers, k):
    from vqgpt.config import from_dict
    from vqgpt.tokenizer.families import build_quantizer
    from vqgpt.tokenizer.quantize import QuantizerConfig

    for variant in bench_tokenizers.VARIANTS:
        section = bench_tokenizers.quantizer_section(variant, k, bypass_steps=7)
        cfg = from_dict(QuantizerConfig, section, "quantizer")
        assert (cfg.codebook_size, cfg.bypass_steps) == (k, 7)
        quantizer = build_quantizer(64, cfg)  # the recipes' latent_dim: the code dim fits
        codes = quantizer.eval()(torch.randn(2, 64, 3, 3)).codes
        assert codes.shape == (2, 3, 3) and 0 <= int(codes.min()) and int(codes.max()) < k
    assert (
        from_dict(
            QuantizerConfig, bench_tokenizers.quantizer_section("vq-rotation", k, 0), "q"
        ).estimator
        == "rotation"
    )


def test_bench_tokenizers_quantizer_overrides_go_over_vqgpt_rows_only(bench_tokenizers):
    """`--set quantizer.<key>=...` is an ablation of vqgpt's row (over the variant's section);
    a peer row keeps the variant's section (it reads only bypass_steps)."""
    overrides = ["quantizer.dead_code_threshold=2", "quantizer.dead_code_sampling=uniform"]

    def quantizer(impl: str):
        job = bench_tokenizers.Job(
            "shapes", "vq-ste", impl, 0, 1024, 10, None, 8, overrides, "/tmp/unused"
        )
        return bench_tokenizers.recipe_of(job).quantizer

    vqgpt, peer = quantizer("vqgpt"), quantizer("peer")
    assert (vqgpt.dead_code_threshold, vqgpt.dead_code_sampling) == (2.0, "uniform")
    assert (vqgpt.ema_decay, vqgpt.estimator) == (0.95, "ste")  # the rest is the variant's
    assert (peer.dead_code_threshold, peer.dead_code_sampling) == (0.0, "error")


def _bench_tokenizers(repo_root, python_forked, out, *args) -> tuple[str, list[dict]]:
    python, env = python_forked()  # the script, its rows and its LM runs fork from the server
    result = subprocess.run(
        [
            *python,
            str(repo_root / "scripts" / "bench_tokenizers.py"),
            "--quick",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, (
        result.stderr[-3000:] + (out / "shapes" / "rows.log").read_text()[-3000:]
    )
    rows = json.loads((out / "shapes" / "results.json").read_text())
    assert (out / "shapes" / "table.md").read_text().strip() in result.stdout
    return result.stdout, rows


def test_bench_tokenizers_quick_measures_every_row(repo_root, python_forked, tmp_path):
    """~25 s: two variants trained 3 steps each, measured on 16 held-out shapes images."""
    stdout, rows = _bench_tokenizers(
        repo_root,
        python_forked,
        tmp_path,
        "--no-peer",
        "--variants",
        "vq-rotation",
        "fsq",
        "--set",
        "quantizer.bypass_steps=2",
    )
    assert [(r["variant"], r["impl"], r["steps"]) for r in rows] == [
        ("vq-rotation", "vqgpt", 3),
        ("fsq", "vqgpt", 3),
    ]
    for r in rows:
        assert r["num_images"] == 16 and r["codebook_size"] == 64
        assert r["dead_codes"] == 64 - round(64 * r["usage"]) and 0 < r["usage"] <= 1
        assert 1 <= r["perplexity"] <= 64 and r["psnr"] > 0 and r["s_per_step"] > 0
        assert 0 <= r["ceiling"] <= 1 and r["ceiling_originals"] == 1.0
        assert 0 < r["neighbour_psnr"] <= 100  # dB, capped where the swap changes nothing
        assert 0 <= r["code_stability"] <= 1
        assert 0 <= r["code_locality"] <= 1
        config = (tmp_path / "shapes" / f"{r['variant']}-vqgpt-s0" / "config.yaml").read_text()
        assert "type: fsq" in config if r["variant"] == "fsq" else "estimator: rotation" in config
        assert "bypass_steps: 2" in config  # --set reaches the recipe
    table_rows = [
        ln for ln in stdout.splitlines() if ln.startswith("| vq") or ln.startswith("| fsq")
    ]
    assert [ln.split("|")[1:3] for ln in table_rows] == [
        [" vq-rotation ", " vqgpt "],
        [" fsq ", " vqgpt "],
    ]
    assert "shapes checker on the originals 100.0%" in stdout


def _tiny_vqvae(codebook_size: int):
    """(model, its codebook tensor): a random 32x32 -> 8x8 VQVAE with 8-dim codes, seeded."""
    from vqgpt.tokenizer.quantize import QuantizerConfig
    from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig

    torch.manual_seed(0)
    arch = ModelConfig(image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8,
                       norm_groups=4)  # fmt: skip
    model = VQVAE(VQVAEConfig.build(arch, QuantizerConfig(codebook_size=codebook_size))).eval()
    return model, model.quantizer.codebooks[0].embed


def test_neighbour_swap_psnr_is_high_where_each_code_has_a_near_twin(bench_tokenizers):
    """The code-neighbourhood smoothness metric: with codes in near-identical pairs, each code's
    nearest other code is its twin (never itself) and the swap barely changes the decoding;
    with the same codes spread apart, the swap costs tens of dB."""
    model, embed = _tiny_vqvae(codebook_size=16)
    pixels = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        embed.copy_(torch.randn(16, 8) * 3)
    codes = model.encode(pixels)
    spread = bench_tokenizers.neighbour_swap_psnr(model, codes, model.decode(codes))
    with torch.no_grad():
        embed[1::2] = embed[0::2] + 1e-4
    twins = bench_tokenizers.nearest_other_code(model)
    assert twins.tolist() == [i ^ 1 for i in range(16)]  # 0 <-> 1, 2 <-> 3, ...
    codes = model.encode(pixels)
    paired = bench_tokenizers.neighbour_swap_psnr(model, codes, model.decode(codes))
    assert paired > 80 and spread < 40


def test_code_stability_counts_the_codes_that_invisible_noise_flips(bench_tokenizers):
    """1.0 where each encoder vector sits on its own code; about half where it sits midway
    between two near-duplicate codes (the noise then picks the twin at random)."""
    model, embed = _tiny_vqvae(codebook_size=128)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encoder(pixels).permute(0, 2, 3, 1).reshape(-1, 8)  # (64, 8): 8x8 codes
        embed.fill_(1e3)
        embed[:64] = z  # each vector on its own code, the other codes far away
        assert bench_tokenizers.code_stability(model, pixels, model.encode(pixels)) == 1.0
        offset = torch.nn.functional.normalize(torch.randn(64, 8), dim=1) * 1e-4
        embed[0::2], embed[1::2] = z + offset, z - offset  # twins on either side of each vector
        assert 0.2 < bench_tokenizers.code_stability(model, pixels, model.encode(pixels)) < 0.8


def test_code_locality_is_one_for_the_local_encoder_and_below_for_tamings(bench_tokenizers):
    """Far codes kept under an edit of the top half: the local encoder (model.local_encoder)
    keeps every one; taming's encoder, whose codes see the whole image, changes some; a grid
    with no row far enough gives None."""
    from vqgpt.tokenizer.quantize import QuantizerConfig
    from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig

    def model(local: bool, image_size: int = 64) -> VQVAE:
        torch.manual_seed(0)
        arch = ModelConfig(image_size=image_size, base_channels=8, latent_dim=8, norm_groups=4,
                           local_encoder=local)  # fmt: skip
        return VQVAE(VQVAEConfig.build(arch, QuantizerConfig(codebook_size=256))).eval()

    pixels = torch.rand(6, 3, 64, 64) * 2 - 1
    scores = {}
    for local in (True, False):
        m = model(local)
        scores[local] = bench_tokenizers.code_locality(m, pixels, m.encode(pixels))
    assert scores[True] == 1.0 and scores[False] < 0.9
    small = model(True, image_size=32)  # 4 x 4 codes: rows 0-1 edited, none 3 rows below
    few = torch.rand(2, 3, 32, 32) * 2 - 1
    assert bench_tokenizers.code_locality(small, few, small.encode(few)) is None


def test_bench_tokenizers_remeasure_adds_new_metrics_without_training(
    repo_root, python_forked, tmp_path
):
    """--remeasure: a row run before a metric existed is measured again from its kept weights
    (same PSNR, the new metric added), not trained again."""
    args = ("--no-peer", "--variants", "vq-ste", "--set", "quantizer.bypass_steps=2")
    _, (row,) = _bench_tokenizers(repo_root, python_forked, tmp_path, *args)
    done = tmp_path / "shapes" / "vq-ste-vqgpt-s0" / "bench.json"
    old = {k: v for k, v in row.items() if k != "neighbour_psnr"}
    done.write_text(json.dumps(old))
    metrics = done.parent / "metrics.jsonl"
    trained = metrics.stat().st_mtime_ns
    _, (again,) = _bench_tokenizers(repo_root, python_forked, tmp_path, *args)
    assert "neighbour_psnr" not in again  # without --remeasure a row run is never touched
    _, (again,) = _bench_tokenizers(repo_root, python_forked, tmp_path, *args, "--remeasure")
    assert again["neighbour_psnr"] == pytest.approx(row["neighbour_psnr"], abs=1e-4)
    assert again["psnr"] == pytest.approx(row["psnr"], abs=1e-4)
    assert metrics.stat().st_mtime_ns == trained  # not trained again
    assert json.loads(done.read_text())["neighbour_psnr"] == again["neighbour_psnr"]


def test_bench_tokenizers_sigterm_ends_the_row_process_too(repo_root, tmp_path):
    """SIGTERM to the script ends the row's training process with it (no orphan left training),
    and no bench.json is written for the unfinished row."""
    import signal
    import time

    cmd = [sys.executable, str(repo_root / "scripts" / "bench_tokenizers.py"), "--quick",
           "--no-peer", "--variants", "vq-ste", "--steps", "100000", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    children = Path(f"/proc/{script.pid}/task/{script.pid}/children")
    deadline = time.time() + 120
    while not children.read_text().split() and time.time() < deadline:
        time.sleep(0.2)
    (row,) = map(int, children.read_text().split())  # the row's worker process
    time.sleep(2)  # let it start training
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while Path(f"/proc/{row}").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{row}").exists()  # killed and reaped
    assert not (tmp_path / "shapes" / "vq-ste-vqgpt-s0" / "bench.json").exists()


def test_bench_tokenizers_peer_row_matches_vqgpt_fsq(
    repo_root, python_forked, tmp_path, bench_tokenizers
):
    """The peer's FSQ in the same network, data, steps and seed gives vqgpt's FSQ numbers: only
    with the peer already installed (`bench_tokenizers.py --peer` installs it once)."""
    cache = Path(os.environ.get("VQGPT_BENCH_PEER_CACHE", bench_tokenizers.DEFAULT_PEER_CACHE))
    if not bench_tokenizers.peer_ready(cache):
        pytest.skip(
            f"vector-quantize-pytorch is not installed in {cache} (run the script with --peer once)"
        )
    _, rows = _bench_tokenizers(
        repo_root,
        python_forked,
        tmp_path,
        "--peer",
        "--peer-cache",
        str(cache),
        "--variants",
        "fsq",
    )
    ours, peer = rows
    assert (ours["impl"], peer["impl"], peer["peer_version"]) == (
        "vqgpt",
        "peer",
        bench_tokenizers.PEER_VERSION,
    )
    assert peer["psnr"] == pytest.approx(ours["psnr"], abs=0.01)
    assert peer["usage"] == pytest.approx(ours["usage"], abs=1 / 64)


@pytest.mark.parametrize("sampling", ["uniform", "error"])
def test_vq_with_the_peer_dead_code_rule_is_the_peer_step_by_step(
    repo_root, python_forked, bench_tokenizers, sampling
):
    """vqgpt's EMA VQ with the peer's dead-code rule (`dead_code_threshold=2`,
    `dead_code_sampling=uniform`, no unused-steps rule) is vector-quantize-pytorch's
    VectorQuantize draw for draw: the same codes and codebooks (float rounding) at every step of
    k-means init, EMA updates and re-seeding. With vqgpt's default error-weighted draws the
    codebooks part at the first re-seeding (step 0, right after the k-means init). Only with
    the peer already installed."""
    cache = Path(os.environ.get("VQGPT_BENCH_PEER_CACHE", bench_tokenizers.DEFAULT_PEER_CACHE))
    if not bench_tokenizers.peer_ready(cache):
        pytest.skip(f"vector-quantize-pytorch is not installed in {cache}")
    python, env = python_forked()
    script = repo_root / "tests" / "tokenizer" / "peer_scripts" / "vq_step_by_step.py"
    site = str(bench_tokenizers.peer_site(cache))
    result = subprocess.run([*python, str(script), site, sampling],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert len(steps) == 12
    assert steps[0]["codes_equal"]  # k-means init alike; re-seeding follows in the same step
    if sampling == "uniform":
        assert all(s["codes_equal"] for s in steps)
        assert max(s["codebook_diff"] for s in steps) < 1e-4
        assert all(s["loss"] == pytest.approx(s["peer_loss"], rel=1e-5) for s in steps)
    else:
        assert max(s["codebook_diff"] for s in steps) > 0.1


def test_bench_tokenizers_lm_column_trains_one_lm_per_seed(repo_root, python_forked, tmp_path):
    """--lm: per vqgpt row, one short LM run per seed on that tokenizer's codes (pretokenised
    once), its held-out image-token loss and single-draw text-to-image accuracy, mean ± sd."""
    stdout, rows = _bench_tokenizers(
        repo_root,
        python_forked,
        tmp_path,
        "--no-peer",
        "--variants",
        "vq-ste",
        "--set",
        "quantizer.bypass_steps=2",
        "--lm",
        "--lm-seeds",
        "0",
        "1",
    )
    (row,) = rows
    runs = row["lm"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and row["lm"]["steps"] == 2
    for r in runs:
        assert r["image_loss"] > 0 and 0 <= r["t2i"] <= 1 and 0 <= r["caption"] <= 1
        assert r["image_loss_unigram"] > 0 and set(r["t2i_attributes"]) >= {"color", "shape"}
        lm_config = json.loads((tmp_path / "shapes" / "vq-ste-vqgpt-s0" / f"lm-s{r['seed']}"
                                / "final" / "config.json").read_text())  # fmt: skip
        assert lm_config["vocab_size"] > 50257 + 64  # GPT-2's text ids + the row's 64 codes
    assert runs[0]["image_loss"] != runs[1]["image_loss"]  # two seeds, two runs
    codes = tmp_path / "shapes" / "vq-ste-vqgpt-s0" / "lm_codes"
    assert (codes / "train").is_dir()  # pretokenised once, shared by the seeds
    assert "LM image loss (nats)" in stdout and "| 2 |" in stdout.splitlines()[-1]


def test_bench_tokenizers_impls_splits_the_rows_between_processes(bench_tokenizers, tmp_path):
    """`--impls vqgpt` and `--impls peer` plan disjoint rows whose union is `--peer`'s plan."""
    import argparse

    def names(*impls: str) -> list[str]:
        args = argparse.Namespace(
            quick=False, codebook_size=1024, dataset="shapes", set=[], steps=10, minutes=None,
            eval_images=8, peer=True, impls=list(impls) or None, variants=["fsq", "lfq"],
            seeds=[0, 1], out=str(tmp_path),
        )  # fmt: skip
        return [job.name for job in bench_tokenizers.plan(args)]

    both, vqgpt, peer = names(), names("vqgpt"), names("peer")
    assert len(both) == 8 and sorted(vqgpt + peer) == sorted(both)
    assert all(n.split("-")[1] == "vqgpt" for n in vqgpt) and len(vqgpt) == 4
