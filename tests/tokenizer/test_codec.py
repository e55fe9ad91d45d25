"""`vqgpt encode` / `vqgpt reconstruct` on real files, bad files included."""

import json

import pytest
import torch
from PIL import Image

from vqgpt.data.images import ImageTransform
from vqgpt.tokenizer.codec import load_tokenizer_model, resolve_model_dir


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("L", (32, 32), 128).save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def test_encode_writes_the_models_codes(tiny_tokenizer_run, image_folder, tmp_path, run_cli):
    out = tmp_path / "codes.jsonl"
    result = run_cli(
        "encode", "--model", str(tiny_tokenizer_run), str(image_folder), "--out", str(out)
    )
    assert "2 image(s) processed, 1 skipped" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["gray.png", "red.png"]
    model = load_tokenizer_model(tiny_tokenizer_run)
    transform = ImageTransform(model.config.arch.image_size)
    for row in rows:
        pixels = transform(Image.open(row["file"]).convert("RGB"))[None]
        assert torch.equal(torch.tensor(row["codes"]), model.encode(pixels)[0])


def test_reconstruct_writes_images_and_a_grid(tiny_tokenizer_run, image_folder, tmp_path, run_cli):
    out = tmp_path / "recon"
    run_cli("reconstruct", "--model", str(tiny_tokenizer_run), str(image_folder), "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["gray_recon.png", "grid.png", "red_recon.png"]
    assert Image.open(out / "red_recon.png").size == (32, 32)


def test_model_dir_resolution_and_errors(tiny_tokenizer_run, tmp_path, run_cli):
    assert resolve_model_dir(tiny_tokenizer_run) == tiny_tokenizer_run / "final"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="image_tokenizer/ is missing"):
        resolve_model_dir(tmp_path)
    result = run_cli("encode", "--model", str(tmp_path), "x.png", check=False)
    assert result.returncode == 2 and "image_tokenizer/ is missing" in result.stderr
