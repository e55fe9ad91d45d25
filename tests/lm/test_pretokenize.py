"""Pretokenisation: codes equal direct encoding, re-runs do nothing, changes redo, 2 ranks = 1."""

from __future__ import annotations

import importlib.util
import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import vqgpt.lm.pretokenize as pretok
from vqgpt.cli import main as cli_main
from vqgpt.config import ConfigError, from_dict, to_dict
from vqgpt.data.images import ImageTransform, load_rgb
from vqgpt.data.shapes import ShapesConfig, shapes_dataset, write_image_folder
from vqgpt.data.sources import DataConfig, load_image_dataset
from vqgpt.lm.pretokenize import (
    CHUNK_RECORD,
    MARKER,
    PretokenizeConfig,
    chunk_name,
    codes_dtype,
    codes_tensor,
    encode_rows,
    load_codes,
    pretokenize,
    read_chunk_info,
    read_split_info,
    tokenizer_fingerprint,
)
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.tokenizer.quantize import QuantizerConfig
from vqgpt.tokenizer.vqvae import VQVAE, ModelConfig, VQVAEConfig

BATCH = 4  # divides every shard below, so 1 and 2 processes run the same batch shapes
ROWS_SCRIPT = Path(__file__).parent / "dist_scripts" / "pretokenize_rows.py"
SHAPES = dict(num_images=40, num_test_images=16, image_size=32)


def shapes_config(tokenizer: Path, out: Path, **shapes) -> PretokenizeConfig:
    images = DataConfig(source="shapes", image_size=32, shapes=ShapesConfig(**{**SHAPES, **shapes}))
    return PretokenizeConfig(
        tokenizer=str(tokenizer), images=images, output_dir=str(out), batch_size=BATCH
    )


def direct_codes(model, images: list[Image.Image]) -> torch.Tensor:
    """model.encode over the images in chunks of BATCH: the reference for the stored codes."""
    transform = ImageTransform(model.config.arch.image_size)
    pixels = torch.stack([transform(load_rgb(im)) for im in images])
    return torch.cat([model.encode(chunk) for chunk in pixels.split(BATCH)])


def load_rows_script():
    """tests/lm/dist_scripts/pretokenize_rows.py as a module: its rows with bad images."""
    spec = importlib.util.spec_from_file_location("pretokenize_rows", ROWS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rows_script = load_rows_script()


def rows_config(tokenizer: Path, out: Path) -> PretokenizeConfig:
    """The config pretokenize_rows.py runs with."""
    return PretokenizeConfig(
        tokenizer=str(tokenizer),
        images=DataConfig(source="rows", image_size=32),
        output_dir=str(out),
        splits=["train"],
        batch_size=BATCH,
        chunk_rows=rows_script.CHUNK_ROWS,
    )


def count_encoded_chunks(monkeypatch, chunk_rows: int) -> list[int]:
    """Record the chunk of every `encode_images` call that pretokenize makes from now on."""
    calls: list[int] = []
    encode = pretok.encode_images

    def counting(model, values, *args, **kwargs):
        values = iter(values)
        first = next(values)
        calls.append(first[0] // chunk_rows)
        return encode(model, [first, *values], *args, **kwargs)

    monkeypatch.setattr(pretok, "encode_images", counting)
    return calls


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, run_cli, tiny_tokenizer_recipe, write_yaml) -> Path:
    """A tiny tokenizer trained with the real CLI (2 steps, no eval)."""
    run = tmp_path_factory.mktemp("tok") / "run"
    recipe = tiny_tokenizer_recipe(
        run, train=dict(max_steps=2, save_every=0), eval=dict(max_images=0)
    )
    run_cli("train-tokenizer", "--config", str(write_yaml(run.parent / "r.yaml", recipe)))
    return run  # a run folder: resolved to run/final


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """One in-process pretokenisation of shapes train + test."""
    cfg = shapes_config(tokenizer, tmp_path_factory.mktemp("codes") / "out")
    return cfg, pretokenize(cfg)


def test_codes_equal_direct_encoding_in_source_order(tokenizer, reference):
    cfg, result = reference
    model = load_tokenizer_model(tokenizer)
    assert list(result.splits) == ["train", "test"] and result.did_work
    for split, n in (("train", 40), ("test", 16)):
        assert not result.splits[split].already_done and result.splits[split].rows == n
        ds = load_codes(cfg.output_dir, split)
        source = load_image_dataset(cfg.images, split)
        assert ds.column_names == ["codes", "text", "objects"]
        assert ds.features["codes"] == datasets.Array2D((8, 8), "int16")
        assert ds["text"] == source["text"] and ds["objects"] == source["objects"]
        stored = codes_tensor(ds[:])  # (n, 8, 8)
        assert stored.shape == (n, 8, 8) and stored.dtype == torch.long
        assert torch.equal(stored, direct_codes(model, source["image"]))
        assert len(stored.unique()) > 1  # a constant grid would match anything
        info = read_split_info(cfg.output_dir, split)
        assert info.rows == n and info.grid == [8, 8] and info.codebook_size == 32
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)


def test_second_run_does_no_work(reference):
    cfg, _ = reference
    before = mtimes(Path(cfg.output_dir))
    again = pretokenize(cfg)
    assert not again.did_work
    assert all(r.already_done for r in again.splits.values())
    assert [r.rows for r in again.splits.values()] == [40, 16]
    assert "already done" in again.summary()
    assert mtimes(Path(cfg.output_dir)) == before  # nothing rewritten, nothing added


def test_unfinished_changed_tokenizer_or_source_is_redone(tokenizer, tmp_path, capsys):
    cfg = replace(shapes_config(tokenizer, tmp_path / "out"), splits=["test"])
    assert pretokenize(cfg).did_work
    first = codes_tensor(load_codes(cfg.output_dir, "test")[:])

    (tmp_path / "out" / "test" / MARKER).unlink()  # as if killed before the marker was written
    assert pretokenize(cfg).did_work

    # a different tokenizer: the same weights with the codebook rows reversed
    model = load_tokenizer_model(tokenizer)
    model.quantizer.codebooks[0].embed.data = model.quantizer.codebooks[0].embed.data.flip(0)
    model.save_pretrained(tmp_path / "tok2")
    capsys.readouterr()
    redone = pretokenize(replace(cfg, tokenizer=str(tmp_path / "tok2")))
    assert redone.did_work
    # the replaced codes are said, with what differs
    assert "holds codes of another tokenizer than this run's" in capsys.readouterr().err
    second = codes_tensor(load_codes(cfg.output_dir, "test")[:])
    source = load_image_dataset(cfg.images, "test")
    assert torch.equal(second, direct_codes(model, source["image"]))
    assert not torch.equal(second, first)
    info = read_split_info(cfg.output_dir, "test")
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tmp_path / "tok2")

    # a different source: other shapes (seed 1), with the second tokenizer
    other = replace(shapes_config(tmp_path / "tok2", tmp_path / "out", seed=1), splits=["test"])
    assert pretokenize(other).did_work
    assert "holds codes of another source than this run's" in capsys.readouterr().err
    assert load_codes(cfg.output_dir, "test")["text"] != source["text"]
    assert not pretokenize(other).did_work


def test_bad_images_in_a_folder_are_skipped_and_counted(tokenizer, tmp_path):
    folder = write_image_folder(
        shapes_dataset(ShapesConfig(num_images=6, image_size=32)), tmp_path / "imgs"
    )
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with (folder / "metadata.jsonl").open("a") as fh:
        fh.write(json.dumps({"file_name": "broken.png", "text": "broken", "objects": "[]"}) + "\n")
        fh.write(json.dumps({"file_name": "gone.png", "text": "gone", "objects": "[]"}) + "\n")
    cfg = PretokenizeConfig(
        tokenizer=str(tokenizer),
        images=DataConfig(source=str(folder), image_size=32),
        output_dir=str(tmp_path / "out"),
        splits=["train"],
        batch_size=BATCH,
    )
    result = pretokenize(cfg).splits["train"]
    assert result.rows == 6 and not result.already_done
    assert result.skipped.counts == {"not_an_image": 1, "missing": 1}
    ds = load_codes(cfg.output_dir, "train")
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert ds.column_names == ["codes", "text"]  # folder sources carry no other columns
    assert ds["text"] == [m["text"] for m in meta[:6]]
    images = [Image.open(folder / m["file_name"]) for m in meta[:6]]
    expected = direct_codes(load_tokenizer_model(tokenizer), images)
    assert torch.equal(codes_tensor(ds[:]), expected)
    assert read_split_info(cfg.output_dir, "train").skipped.total == 2


def test_encode_rows_skips_rows_that_do_not_decode(tokenizer):
    model = load_tokenizer_model(tokenizer)
    good = shapes_dataset(ShapesConfig(num_images=5, image_size=32))["image"]
    png = []
    for im in good:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        png.append(buf.getvalue())
    raw = [png[0], b"garbage", png[1], png[2], b"", png[3], png[4]]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in raw], "text": [""] * len(raw)},
        features=datasets.Features(image=datasets.Image(), text=datasets.Value("string")),
    )
    encoded = encode_rows(model, ds, range(1, 7), batch_size=2)  # rows 1..6
    assert encoded.rows == [2, 3, 5, 6]
    assert encoded.stats.counts == {"not_an_image": 1, "empty": 1}
    assert [e.split(" (")[0] for e in encoded.stats.examples] == ["row 1", "row 4"]
    assert encoded.codes.dtype == np.int16 and encoded.codes.shape == (4, 8, 8)
    transform = ImageTransform(32)
    pixels = torch.stack([transform(im) for im in good[1:5]])
    expected = torch.cat([model.encode(pixels[:2]), model.encode(pixels[2:])])
    assert torch.equal(torch.from_numpy(encoded.codes).long(), expected)


def test_residual_codes_are_stored_as_h_w_levels(tmp_path):
    arch = ModelConfig(
        image_size=32, base_channels=8, channel_mult=(1, 2), latent_dim=8, norm_groups=4
    )
    model = VQVAE(
        VQVAEConfig.build(arch, QuantizerConfig(codebook_size=64, num_quantizers=2))
    ).eval()
    model.save_pretrained(tmp_path / "rvq")
    cfg = replace(shapes_config(tmp_path / "rvq", tmp_path / "out"), splits=["test"])
    pretokenize(cfg)
    ds = load_codes(cfg.output_dir, "test")
    assert ds.features["codes"] == datasets.Array3D((8, 8, 2), "int16")
    source = load_image_dataset(cfg.images, "test")
    assert torch.equal(codes_tensor(ds[:]), direct_codes(model, source["image"]))
    assert (codes_dtype(2**15), codes_dtype(2**15 + 1)) == (np.int16, np.int32)


# ---------------------------------------------------------------------------------------------
# chunks: layout, equality with one pass, resume after a kill, streamed input


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_chunks_equal_encoding_all_rows_at_once(tokenizer, tmp_path, monkeypatch, kind):
    ds = rows_script.rows_dataset()  # 30 rows, 3 garbage and 1 empty image
    source = rows_script.source(kind)
    monkeypatch.setattr(pretok, "load_image_dataset", lambda cfg, split, stats=None: source)
    cfg = rows_config(tokenizer, tmp_path / "out")
    result = pretokenize(cfg).splits["train"]
    whole = encode_rows(load_tokenizer_model(tokenizer), ds, range(len(ds)), BATCH)

    got = load_codes(cfg.output_dir, "train")
    assert got.column_names == ["codes", "text", "id"]
    assert got["id"] == whole.rows == [i for i in range(30) if i not in (3, 11, 12, 25)]
    assert got["text"] == [ds[i]["text"] for i in whole.rows]
    assert torch.equal(codes_tensor(got[:]), torch.from_numpy(whole.codes).long())

    split_dir = tmp_path / "out" / "train"
    names = [chunk_name(c) for c in range(4)]
    assert sorted(p.name for p in split_dir.iterdir()) == [*names, MARKER]
    assert {Path(f["filename"]).parent.name for f in got.cache_files} == set(names)  # mmapped
    info = read_split_info(cfg.output_dir, "train")
    chunks = [read_chunk_info(split_dir, c) for c in range(4)]
    assert [(c.start, c.stop, c.rows) for c in chunks] == [
        (0, 8, 7),
        (8, 16, 6),
        (16, 24, 8),
        (24, 30, 5),
    ]
    assert (info.chunks, info.chunk_rows_kept, info.source_rows) == (names, [7, 6, 8, 5], 30)
    # skips add up over the chunks: the split's counts are the sum of the chunks'
    assert [c.skipped.total for c in chunks] == [1, 2, 0, 1]
    assert result.skipped.counts == info.skipped.counts == whole.stats.counts
    assert whole.stats.counts == {"not_an_image": 3, "empty": 1}
    assert (result.rows, result.chunks, result.chunks_encoded) == (26, 4, 4)


KILL_SCRIPT = """
import sys, time
import vqgpt.lm.pretokenize as pretok
from vqgpt.data.shapes import ShapesConfig
from vqgpt.data.sources import DataConfig
write = pretok.write_chunk
def slow(*args, **kwargs):  # a pause after each chunk: the kill lands between two chunks
    info = write(*args, **kwargs)
    time.sleep(2)
    return info
pretok.write_chunk = slow
shapes = ShapesConfig(num_images=40, num_test_images=16, image_size=32)
pretok.pretokenize(pretok.PretokenizeConfig(
    tokenizer=sys.argv[1], images=DataConfig(source="shapes", image_size=32, shapes=shapes),
    output_dir=sys.argv[2], splits=["train"], batch_size=4, chunk_rows=8))
"""


def test_killed_run_resumes_only_the_unfinished_chunks(
    tokenizer, reference, tmp_path, monkeypatch, cli_env
):
    out = tmp_path / "out"
    split_dir = out / "train"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tokenizer), str(out)],
        env=cli_env(),
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (split_dir / chunk_name(1) / CHUNK_RECORD).is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no second chunk appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {c for c in range(5) if read_chunk_info(split_dir, c) is not None}
    assert {0, 1} <= finished and len(finished) < 5
    assert read_split_info(out, "train") is None  # no index: unfinished
    with pytest.raises(FileNotFoundError):
        load_codes(out, "train")
    (split_dir / f"{chunk_name(4)}.tmp").mkdir()  # as if killed while saving chunk 4
    (split_dir / f"{chunk_name(4)}.tmp" / "data-00000-of-00001.arrow").write_bytes(b"torn")
    kept = {c: mtimes(split_dir / chunk_name(c)) for c in finished}

    encoded = count_encoded_chunks(monkeypatch, chunk_rows=8)
    cfg, _ = reference
    resumed = replace(cfg, output_dir=str(out), splits=["train"], chunk_rows=8)
    result = pretokenize(resumed).splits["train"]
    assert sorted(encoded) == sorted(set(range(5)) - finished)  # only the unfinished ones
    assert (result.chunks, result.chunks_encoded) == (5, 5 - len(finished))
    assert {c: mtimes(split_dir / chunk_name(c)) for c in finished} == kept
    assert sorted(p.name for p in split_dir.iterdir()) == [chunk_name(c) for c in range(5)] + [
        MARKER
    ]
    uninterrupted = load_codes(cfg.output_dir, "train")
    assert load_codes(out, "train")[:] == uninterrupted[:]


def test_other_chunk_rows_or_an_older_layout_is_redone(tokenizer, tmp_path, monkeypatch):
    ds = rows_script.rows_dataset()
    monkeypatch.setattr(pretok, "load_image_dataset", lambda cfg, split, stats=None: ds)
    cfg = rows_config(tokenizer, tmp_path / "out")
    split_dir = tmp_path / "out" / "train"
    split_dir.mkdir(parents=True)  # a split as format 1 wrote it: one Arrow dataset
    ds.select(range(3)).remove_columns("image").save_to_disk(str(split_dir))
    (split_dir / MARKER).write_text(json.dumps({"version": 1, "split": "train", "rows": 3}))
    assert read_split_info(cfg.output_dir, "train") is None
    with pytest.raises(FileNotFoundError):
        load_codes(cfg.output_dir, "train")
    assert pretokenize(cfg).did_work
    assert sorted(p.name for p in split_dir.iterdir()) == [chunk_name(c) for c in range(4)] + [
        MARKER
    ]

    encoded = count_encoded_chunks(monkeypatch, chunk_rows=16)
    again = pretokenize(replace(cfg, chunk_rows=16)).splits["train"]
    assert sorted(encoded) == [0, 1] and (again.chunks, again.chunks_encoded) == (2, 2)
    assert sorted(p.name for p in split_dir.iterdir()) == [chunk_name(0), chunk_name(1), MARKER]
    assert load_codes(cfg.output_dir, "train")["id"] == [
        i for i in range(30) if i not in (3, 11, 12, 25)
    ]


@pytest.mark.slow
def test_two_processes_finish_a_one_process_run_and_stream(
    reference,
    tokenizer,
    accelerate_launcher,
    tmp_path,
    run_cli,
    run_command,
    write_yaml,
    monkeypatch,
):
    """~40 s: 2 processes resume a 1-process run killed after 2 chunks; a 2-process streamed run
    with bad images equals one process, its skips summed over chunks and ranks."""
    cfg, _ = reference
    out = tmp_path / "out2"
    chunked = replace(cfg, output_dir=str(out), chunk_rows=8)  # train: 5 chunks, test: 2
    encode = pretok.encode_images
    calls = []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return encode(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pretok, "encode_images", fail_third)
        with pytest.raises(RuntimeError, match="killed"):
            pretokenize(chunked)
    assert [read_chunk_info(out / "train", c) is not None for c in range(5)] == [1, 1, 0, 0, 0]

    recipe = write_yaml(tmp_path / "lm.yaml", {"data": to_dict(chunked)})
    proc = run_cli("pretokenize", "--config", str(recipe), launcher=accelerate_launcher)
    assert proc.stderr.count("(written)") == 2  # the summary comes from rank 0 only
    assert "train: 40 rows, 5 chunks (3 encoded, 2 kept)" in proc.stderr
    assert "test: 16 rows, 2 chunks (2 encoded, 0 kept)" in proc.stderr
    for split in ("train", "test"):
        one, two = load_codes(cfg.output_dir, split), load_codes(out, split)
        assert two.features == one.features
        assert two[:] == one[:]
        a, b = read_split_info(cfg.output_dir, split), read_split_info(out, split)
        assert (b.rows, b.source, b.tokenizer_fingerprint) == (
            a.rows,
            a.source,
            a.tokenizer_fingerprint,
        )
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # no scratch left

    # streamed rows with bad images: ranks 0 and 1 encode chunks 0, 2 and 1, 3
    streamed = tmp_path / "streamed"
    launch = [*accelerate_launcher, str(ROWS_SCRIPT), "stream", str(tokenizer), str(streamed)]
    run_command(launch)
    ds = rows_script.rows_dataset()
    monkeypatch.setattr(pretok, "load_image_dataset", lambda cfg, split, stats=None: ds)
    single = rows_config(tokenizer, tmp_path / "single")
    pretokenize(single)
    assert load_codes(streamed, "train")[:] == load_codes(single.output_dir, "train")[:]
    info = read_split_info(streamed, "train")
    assert info.skipped.counts == {"not_an_image": 3, "empty": 1}
    chunks = [read_chunk_info(streamed / "train", c) for c in range(4)]
    assert [c.skipped.total for c in chunks] == [1, 2, 0, 1] and info.rows == 26


# ---------------------------------------------------------------------------------------------
# config, reading helpers, command line


def test_config_defaults_to_the_dataset_split_names_and_loads_as_a_section():
    cfg = from_dict(
        PretokenizeConfig,
        {"tokenizer": "t", "images": {"train_split": "fit", "eval_split": "val"}},
        "data",
    )
    assert cfg.splits == ["fit", "val"] and cfg.batch_size == 64


@pytest.mark.parametrize(
    "bad",
    [
        dict(batch_size=0),
        dict(tokenizer=""),
        dict(output_dir=""),
        dict(splits=[]),
        dict(splits=["train", "train"]),
        dict(splits=["a/b"]),
        dict(splits=["train.tmp"]),
    ],
)
def test_config_rejects(bad):
    with pytest.raises(ConfigError):
        PretokenizeConfig(**bad)


def test_codes_tensor_reads_rows_batches_and_torch_format(reference):
    cfg, _ = reference
    ds = load_codes(cfg.output_dir, "test")
    batch = codes_tensor(ds[2:5])
    assert batch.shape == (3, 8, 8) and batch.dtype == torch.long
    assert torch.equal(codes_tensor(ds[3]), batch[1])
    assert torch.equal(codes_tensor(ds.with_format("torch")[2:5]), batch)
    assert torch.equal(codes_tensor([t for t in batch]), batch)
    with pytest.raises(ValueError, match="at least 2 dims"):
        codes_tensor([1, 2, 3])


def test_missing_output_and_missing_tokenizer_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        load_codes(tmp_path, "train")
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(f"data: {{tokenizer: {tmp_path / 'nope'}, output_dir: {tmp_path}}}\n")
    assert cli_main(["pretokenize", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqgpt pretokenize: error:") and "nope: no such folder" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# every input format, streamed or not, gives the same codes


def test_every_format_streamed_or_not_gives_the_same_codes(tokenizer, tmp_path, repo_root):
    """The captioned photos as an image folder, Parquet files and WebDataset shards (loaded or
    streamed, chunk boundaries inside the files): the same codes and captions, row for row."""
    captioned = repo_root / "tests" / "fixtures" / "captioned"
    sources = {
        "folder": dict(source=str(captioned / "folder")),
        "parquet": dict(source=str(captioned / "parquet"), text_column="caption"),
        "webdataset": dict(source=str(captioned / "webdataset" / "{00000..00001}.tar")),
        "webdataset-stream": dict(
            source=str(captioned / "webdataset" / "{00000..00001}.tar"), streaming=True
        ),
    }
    rows = {}
    for name, data in sources.items():
        cfg = PretokenizeConfig(
            tokenizer=str(tokenizer),
            images=DataConfig(image_size=32, **data),
            output_dir=str(tmp_path / name),
            splits=["train"],
            batch_size=BATCH,
            chunk_rows=7,
        )
        assert pretokenize(cfg).splits["train"].rows > 0
        ds = load_codes(tmp_path / name, "train")
        rows[name] = (codes_tensor(ds["codes"]), list(ds["text"]))
    n = len(rows["webdataset"][1])  # the first two shards: a prefix of the folder's rows
    assert n > 7 and rows["webdataset"][1] == rows["folder"][1][:n]
    assert torch.equal(rows["webdataset"][0], rows["folder"][0][:n])
    for name in ("parquet",):
        assert rows[name][1] == rows["folder"][1] and torch.equal(rows[name][0], rows["folder"][0])
    assert rows["webdataset-stream"][1] == rows["webdataset"][1]
    assert torch.equal(rows["webdataset-stream"][0], rows["webdataset"][0])
