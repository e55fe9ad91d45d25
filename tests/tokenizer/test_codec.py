"""`vqgpt encode` / `vqgpt reconstruct` on real files, bad files included."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgpt.data.images import ImageTransform
from vqgpt.tokenizer.codec import load_tokenizer_model, reconstruct_images, resolve_model_dir


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
    assert result.stdout == ""
    assert "2 image(s) processed, 1 skipped (not an image: 1)" in result.stderr
    assert f"skipped {image_folder / 'broken.png'}: not an image" in result.stderr
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
    assert sorted(p.name for p in out.iterdir()) == [
        "gray.png_recon.png",
        "grid.png",
        "index.json",
        "red.png_recon.png",
    ]
    assert Image.open(out / "red.png_recon.png").size == (32, 32)
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == [
        {
            "input": str(image_folder / "broken.png"),
            "reason": "not_an_image",
            "detail": "not an image (no image format recognises the data)",
        }
    ]


def test_model_dir_resolution_and_errors(tiny_tokenizer_run, tmp_path, run_cli):
    assert resolve_model_dir(tiny_tokenizer_run) == tiny_tokenizer_run / "final"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="image_tokenizer/ is missing"):
        resolve_model_dir(tmp_path)
    result = run_cli("encode", "--model", str(tmp_path), "x.png", check=False)
    assert result.returncode == 2 and "image_tokenizer/ is missing" in result.stderr


def test_outputs_never_share_a_name(error_line, tiny_tokenizer_run, tmp_path, run_cli):
    # issue 18, fault 5: twin.png and twin.bmp, the same name in another folder, a file twice
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    colours = {
        a / "twin.png": (200, 10, 10),
        a / "twin.bmp": (10, 10, 200),
        b / "twin.png": (9, 99, 9),
    }
    for path, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(path)
    out = tmp_path / "recon"
    model = ["--model", str(tiny_tokenizer_run)]
    inputs = [str(a), str(b / "twin.png"), str(a / "twin.png")]  # a/twin.png twice
    result = run_cli("reconstruct", *model, *inputs, "--out", str(out))
    assert "3 image(s) processed" in result.stderr
    assert f"{a / 'twin.png'}: given more than once, processed once" in result.stderr
    index = json.loads((out / "index.json").read_text())
    mapping = {e["input"]: e["output"] for e in index["outputs"]}
    assert mapping == {  # folders sorted, then the files in input order; suffix kept
        str(a / "twin.bmp"): "twin.bmp_recon.png",
        str(a / "twin.png"): "twin.png_recon.png",
        str(b / "twin.png"): "twin.png_recon-2.png",
    }
    tokenizer = load_tokenizer_model(tiny_tokenizer_run)
    for source, name in mapping.items():  # each file is the reconstruction of its own input
        want = np.asarray(reconstruct_images(tokenizer, [Image.open(source).convert("RGB")])[0])
        got = np.asarray(Image.open(out / name))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, source
    # a second call into the same folder replaces nothing
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (b / "twin.png").unlink()
    Image.new("RGB", (32, 32), (255, 255, 0)).save(b / "twin.png")
    again = run_cli("reconstruct", *model, str(b / "twin.png"), "--out", str(out), check=False)
    assert "twin.png_recon.png already exists" in error_line(again, "reconstruct")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_encode_stdout_is_json_lines_and_messages_go_to_stderr(
    tiny_tokenizer_run, image_folder, run_cli
):
    # issue 18, fault 6: `vqgpt encode img.png > codes.jsonl` must be valid JSON Lines
    model = ["--model", str(tiny_tokenizer_run)]
    for inputs in ([image_folder / "red.png"], [image_folder]):
        result = run_cli("encode", *model, *map(str, inputs))
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [Path(r["file"]).name for r in rows] == [
            f.name for f in sorted(image_folder.glob("*")) if f.name != "broken.png"
        ][-len(rows) :]
        assert all(len(r["codes"]) == 8 for r in rows)
        assert "image(s) processed" in result.stderr and "processed" not in result.stdout


def test_nothing_readable_is_an_error(
    error_line, tiny_tokenizer_run, tmp_path, run_cli, cli_in_process
):
    # issue 18, fault 7: every input unreadable, an empty folder: exit 2, one line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not a picture\n")
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    model = ["--model", str(tiny_tokenizer_run)]
    for command in ("encode", "reconstruct"):
        out = ["--out", str(tmp_path / f"{command}.out")]
        line = error_line(run_cli(command, *model, str(bad), *out, check=False), command)
        assert "none of the 2 image(s) could be read" in line
        assert "empty file" in line and "not an image" in line
        # a real process for the first case, this one for the second (the same main, faster)
        line = error_line(cli_in_process(command, *model, str(empty), *out, check=False), command)
        assert f"no image files in {empty}" in line
        assert not (tmp_path / f"{command}.out").exists()


def test_skip_reasons_say_what_happened(
    error_line, tiny_tokenizer_run, tmp_path, run_cli, cli_in_process, monkeypatch
):
    # issue 18, fault 8: a valid 20000x10000 PNG is too large (with the limit and the knob), not
    # "unreadable"; truncated and empty files say so too
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (20000, 10000), 7).save(folder / "huge.png")  # one colour: ~200 kB on disk
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(full, format="PNG")
    (folder / "cut.png").write_bytes(full.getvalue()[:200])
    (folder / "zero.png").write_bytes(b"")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "fine.png")
    Image.new("RGB", (33, 33), (1, 2, 3)).save(folder / "wide.png")
    model = ["--model", str(tiny_tokenizer_run)]
    result = run_cli("encode", *model, str(folder))
    assert len(result.stdout.splitlines()) == 2
    err = result.stderr
    assert "3 skipped (empty file: 1, truncated: 1, too large: 1)" in err
    assert f"skipped {folder / 'huge.png'}: too large: 20000x10000 = 200,000,000 pixels" in err
    assert "over the limit of 89,478,485" in err and "VQGPT_MAX_IMAGE_PIXELS" in err
    assert f"skipped {folder / 'cut.png'}: truncated" in err
    assert f"skipped {folder / 'zero.png'}: empty file" in err
    # the knob: a lower limit skips 40x30 (1200 pixels) but keeps 33x33 (1089)
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "1100")
    result = cli_in_process("encode", *model, str(folder / "fine.png"), str(folder / "wide.png"))
    assert [Path(json.loads(r)["file"]).name for r in result.stdout.splitlines()] == ["wide.png"]
    assert "over the limit of 1,100" in result.stderr
    line = error_line(
        cli_in_process("encode", *model, str(folder / "huge.png"), check=False), "encode"
    )
    assert "too large" in line and "VQGPT_MAX_IMAGE_PIXELS" in line
    monkeypatch.setenv("VQGPT_MAX_IMAGE_PIXELS", "lots")
    line = error_line(
        cli_in_process("encode", *model, str(folder / "fine.png"), check=False), "encode"
    )
    assert "VQGPT_MAX_IMAGE_PIXELS='lots' must be a whole number" in line


def test_an_output_file_is_never_one_of_the_inputs(
    error_line, tiny_tokenizer_run, tmp_path, run_cli, cli_in_process
):
    # issue 18, second round: `encode keep.png --out keep.png` replaced the image with JSON
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("1.png", "2.png"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / name)
    (tmp_path / "link.png").symlink_to(folder / "2.png")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    model = ["--model", str(tiny_tokenizer_run)]
    cases = [
        ([str(folder / "1.png")], folder / "1.png"),  # the file given
        ([str(folder)], folder / "2.png"),  # a file found in a folder given
        ([str(folder)], tmp_path / "link.png"),  # through a symlink
        ([str(tmp_path / "link.png")], folder / "2.png"),  # the input a symlink to it
        ([str(folder / "1.png")], tmp_path / "d" / ".." / "d" / "1.png"),  # another spelling
    ]
    for i, (inputs, out) in enumerate(cases):
        run = run_cli if i == 0 else cli_in_process
        line = error_line(run("encode", *model, *inputs, "--out", str(out), check=False), "encode")
        assert f"--out {out} is the input" in line and "would destroy that input" in line
    line = error_line(
        cli_in_process("encode", *model, str(folder / "1.png"), "--out", str(folder), check=False),
        "encode",
    )
    assert "is the input" in line or "is a folder" in line
    assert {p: p.read_bytes() for p in folder.iterdir()} == before  # nothing written
    # reconstruct: an input named like an output in the output folder is not replaced
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "1.png_recon.png")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    result = cli_in_process("reconstruct", *model, str(folder), "--out", str(folder), check=False)
    assert "is the input" in error_line(result, "reconstruct")
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_a_folder_named_like_an_image_is_no_input_and_a_repeat_is_one_line(
    tiny_tokenizer_run, tmp_path, cli_in_process
):
    folder = tmp_path / "d"
    (folder / "dir.png").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    red = str(folder / "a.png")
    result = cli_in_process(
        "reconstruct", "--model", str(tiny_tokenizer_run), str(folder), red, red, red,
        "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert "1 image(s) processed" in result.stderr and "skipped" not in result.stderr
    assert "dir.png" not in result.stderr
    assert result.stderr.count("given") == 1
    assert f"{red}: given 4 times, processed once" in result.stderr
