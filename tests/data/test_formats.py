"""One entry point for every data format: each gives the image folder's rows, bad members are
counted, streaming and not agree, bad inputs are one-line errors, stage one trains on a stream."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from vqgpt.config import ConfigError
from vqgpt.data.images import ImageTransform, read_image
from vqgpt.data.sources import (
    DataConfig,
    StreamingImageTextDataset,
    find_readable,
    load_image_dataset,
)
from vqgpt.training import read_metrics


def rows(ds) -> list[tuple[bytes, str]]:
    """(decoded RGB pixels, text) of every row, in order."""
    out = []
    for row in ds:
        image = read_image(row["image"]).image
        out.append((np.asarray(image).tobytes() if image else None, row["text"]))
    return out


@pytest.fixture(scope="module")
def reference():
    """The image-folder form of the captioned photos."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "captioned" / "folder"
    found = rows(load_image_dataset(DataConfig(source=str(folder)), "train"))
    assert len(found) == 30 and all(pixels for pixels, _ in found)
    return found


SOURCES = {  # name -> (source relative to the fixtures, extra settings, extra columns)
    "csv folder": ("csv_folder", {}, []),
    "parquet folder": ("parquet", {"text_column": "caption"}, ["name"]),
    "parquet glob": ("parquet/*.parquet", {"text_column": "caption"}, ["name"]),
    "webdataset glob": ("webdataset/*.tar", {}, ["json", "__key__", "__url__"]),
    "webdataset brace": ("webdataset/{00000..00002}.tar", {}, ["json", "__key__", "__url__"]),
    "webdataset folder": ("webdataset", {}, ["json", "__key__", "__url__"]),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_every_format_gives_the_folder_rows(captioned, reference, name, streaming):
    source, settings, extra = SOURCES[name]
    cfg = DataConfig(source=str(captioned / source), streaming=streaming, **settings)
    ds = load_image_dataset(cfg, "train")
    assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
    assert ds.column_names[:2] == ["image", "text"] and set(extra) <= set(ds.column_names)
    assert rows(ds) == reference


def test_a_single_shard_the_json_caption_and_the_cap(captioned, reference):
    one = load_image_dataset(DataConfig(source=str(captioned / "webdataset/00000.tar")), "train")
    assert rows(one) == reference[:10] and one[0]["__key__"] == "000000"
    # the last shard has no .txt: its captions come from key.json's data.caption_key
    last = DataConfig(source=str(captioned / "webdataset/00002.tar"), streaming=True)
    assert rows(load_image_dataset(last, "train")) == reference[20:]
    no_key = DataConfig(source=str(captioned / "webdataset/00002.tar"), caption_key="title")
    assert [t for _, t in rows(load_image_dataset(no_key, "train"))] == [""] * 10
    capped = DataConfig(source=str(captioned / "webdataset/*.tar"), num_images=4, streaming=True)
    assert rows(load_image_dataset(capped, "train")) == reference[:4]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_bad_members_are_counted_and_the_shard_kept(captioned, reference, streaming):
    cfg = DataConfig(source=str(captioned / "broken/00000.tar"), streaming=streaming)
    ds = load_image_dataset(cfg, "train")
    keys = [row["__key__"] for row in ds]  # every key is a row; bad images are the reader's
    assert keys == ["a_good", "b_corrupt", "c_empty", "d_text", "e_uncaptioned", "f_no_image", "g_good"]  # fmt: skip
    if streaming:
        view = StreamingImageTextDataset(ds, ImageTransform(32))
        kept = [item["text"] for item in view]
        stats = view.stats
    else:
        readable = find_readable(ds)
        kept = [ds[i]["text"] for i in readable.indices]
        stats = readable.stats
    assert kept == ["a good photo", "", "another good photo"]
    assert dict(stats.counts) == {"missing": 1, "empty": 1, "not_an_image": 1, "truncated": 1}
    assert stats.no_caption == 1 and "1 image(s) without a caption" in str(stats)
    assert "00000.tar:f_no_image" in str(stats) and "00000.tar:c_empty" in str(stats)


def test_streamed_training_view_shuffles_deterministically_per_epoch(captioned):
    cfg = DataConfig(source=str(captioned / "webdataset/*.tar"), streaming=True)

    def texts(epoch: int) -> list[str]:
        view = StreamingImageTextDataset(load_image_dataset(cfg, "train"), ImageTransform(16), 0, 8)
        view.set_epoch(epoch)
        return [item["text"] for item in view]

    first = texts(0)
    assert first == texts(0) and sorted(first) == sorted(texts(1)) and first != texts(1)


def test_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match="data.format='zip' is not one of auto, folder"):
        DataConfig(format="zip")


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("data.source={c}/webdataset/*.tgz", "webdataset/*.tgz matches no file"),
        ("data.source={c}/webdataset/{{00000..00005}}.tar", "00003.tar matches no file"),
        ("data.source={c}/folder/metadata.jsonl data.format=webdataset", "is not a tar archive"),
        (
            "data.source={c}/parquet data.image_column=jpg",
            "column(s) ['jpg', 'text'] not in the dataset; it has ['image', 'caption', 'name']",
        ),  # fmt: skip
        ("data.source={c}/folder/000000.jpg", "cannot tell the format of"),
        ("data.format=parquet data.source={c}/folder", "holds no parquet files"),
        ("data.format=tar", "data.format='tar' is not one of"),
    ],
)
def test_bad_sources_are_one_line_errors(
    captioned, tmp_path, cli_in_process, error_line, setting, expected
):
    overrides = setting.format(c=captioned).split()
    result = cli_in_process(
        "train-tokenizer", "--config", "tokenizer/shapes", f"train.output_dir={tmp_path / 'run'}",
        *overrides, check=False,
    )  # fmt: skip
    line = error_line(result, "train-tokenizer")
    assert expected in line, line


def test_stage_one_trains_and_resumes_on_a_streamed_webdataset(
    captioned, tmp_path, run_cli, tiny_tokenizer_recipe, write_yaml
):
    """30 photos, global batch 8: 3 batches an epoch, so step 4 is in the second epoch; a run
    resumed from step 2 re-reads the stream to its place and logs the same losses."""
    data = dict(source=str(captioned / "webdataset/*.tar"), streaming=True, shuffle_buffer=8)
    train = dict(max_steps=4, save_every=1, keep_checkpoints=4, eval_every=0)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe = tiny_tokenizer_recipe(full, data=data, train=train, eval=dict(max_images=8))
    run_cli("train-tokenizer", "--config", str(write_yaml(tmp_path / "full.yaml", recipe)))
    recipe = tiny_tokenizer_recipe(resumed, data=data, train=train, eval=dict(max_images=8))
    cfg = write_yaml(tmp_path / "resumed.yaml", recipe)
    run_cli("train-tokenizer", "--config", str(cfg), "--resume", str(full / "checkpoints/step_2"))
    reference = {r["step"]: r["total"] for r in read_metrics(full, "train")}
    again = {r["step"]: r["total"] for r in read_metrics(resumed, "train")}
    assert sorted(reference) == [1, 2, 3, 4] and sorted(again) == [3, 4]
    assert all(again[s] == reference[s] for s in again), (again, reference)
    assert (full / "final" / "model.safetensors").is_file()


def test_split_in_the_source_picks_each_splits_shards(captioned, tmp_path):
    """`{split}` in data.source is the split's name: train and test read their own shards."""
    import shutil

    for split, shard in (("train", "00000"), ("test", "00001")):
        (tmp_path / split).mkdir()
        shutil.copy(captioned / "webdataset" / f"{shard}.tar", tmp_path / split / "0.tar")
    cfg = DataConfig(source=f"{tmp_path}/{{split}}/{{0..0}}.tar")
    texts = {split: load_image_dataset(cfg, split)["text"] for split in ("train", "test")}
    for split, shard in (("train", "00000"), ("test", "00001")):
        alone = DataConfig(source=str(captioned / "webdataset" / f"{shard}.tar"))
        assert texts[split] == load_image_dataset(alone, split)["text"]
    assert texts["train"] != texts["test"]


def test_streamed_training_reports_what_the_stream_skipped(
    captioned, tmp_path, cli_in_process, tiny_tokenizer_recipe, write_yaml
):
    """The broken shard streamed: the first epoch ends with one line of skips by reason."""
    data = dict(source=str(captioned / "broken/00000.tar"), streaming=True, shuffle_buffer=4)
    train = dict(batch_size=2, max_steps=2, save_every=0, eval_every=0)
    recipe = tiny_tokenizer_recipe(
        tmp_path / "run", data=data, train=train, eval=dict(max_images=0)
    )
    recipe["data"].pop("shapes")
    result = cli_in_process(
        "train-tokenizer", "--config", str(write_yaml(tmp_path / "r.yaml", recipe))
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("train data, epoch")]
    assert len(lines) == 1 and lines[0].startswith("train data, epoch 0: skipped 4 image(s)")
    for reason in ("missing file: 1", "empty file: 1", "not an image: 1", "truncated: 1"):
        assert reason in lines[0]
    assert "1 image(s) without a caption" in lines[0]
