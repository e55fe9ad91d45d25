"""Text files are UTF-8 whatever the locale, a byte-order mark is dropped, damage names the file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from vqgpt import artifacts
from vqgpt.artifacts import DamagedFileError
from vqgpt.config import load_config
from vqgpt.data.sources import folder_dataset
from vqgpt.files import FileReadError, read_json, read_json_lines, read_text, write_text
from vqgpt.lm.infer import read_prompts
from vqgpt.tokenizer.quantize import QuantizerConfig

BOM = b"\xef\xbb\xbf"


def _png(path) -> None:
    Image.new("RGB", (8, 8), "red").save(path)


def test_a_prompt_file_with_a_byte_order_mark_gives_the_prompt_without_it(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(BOM + b"a red circle\r\na blue square\n")
    assert read_prompts([], str(path)) == ["a red circle", "a blue square"]


def test_a_recipe_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_bytes(BOM + b"codebook_size: 64\ninit: uniform\n")
    cfg = load_config(QuantizerConfig, path)
    assert (cfg.codebook_size, cfg.init) == (64, "uniform")


def test_metadata_jsonl_with_a_byte_order_mark_and_non_ascii_captions(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "un cercle rouge, été"}, {"file_name": "b.png"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "metadata.jsonl").write_bytes(BOM + text.encode("utf-8"))
    ds = folder_dataset(tmp_path, "train")
    assert list(ds["text"]) == ["un cercle rouge, été", ""]


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red \xe9t\xe9 circle\n")  # Latin-1, not UTF-8
    with pytest.raises(FileReadError, match=r"prompts.txt: not UTF-8 text \(byte 6"):
        read_prompts([], str(path))
    with pytest.raises(FileReadError, match="not UTF-8"):
        read_json_lines(path)


def test_a_recipe_that_is_not_utf8_is_one_line_from_the_cli(tmp_path, run_cli):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"data:\n  source: caf\xe9\n")
    result = run_cli("train-tokenizer", "--config", str(path), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"{path}: not UTF-8 text" in result.stderr


# the locale's encoding is ASCII here (LC_ALL=C without Python's UTF-8 mode)
LOCALE_C = """
import json, locale, sys
from pathlib import Path
from vqgpt.data.sources import folder_dataset
from vqgpt.files import write_text
from vqgpt.lm.infer import read_prompts
folder = Path(sys.argv[1])
print(json.dumps({
    "encoding": locale.getpreferredencoding(False),
    "prompts": read_prompts([], str(folder / "prompts.txt")),
    "captions": list(folder_dataset(folder, "train")["text"]),
    "written": str(write_text(folder / "out.txt", "gr\\u00fcn")),
}))
"""


def test_text_files_read_as_utf8_under_an_ascii_locale(tmp_path, cli_env):
    _png(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_bytes(BOM + "a circle, rouge foncé\n".encode())
    meta = json.dumps({"file_name": "a.png", "text": "ein grüner Kreis"}, ensure_ascii=False)
    (tmp_path / "metadata.jsonl").write_bytes(BOM + meta.encode() + b"\n")
    env = {**cli_env(), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    result = subprocess.run(
        [sys.executable, "-c", LOCALE_C, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["encoding"].lower().replace("-", "") != "utf8"  # the test means something
    assert out["prompts"] == ["a circle, rouge foncé"]
    assert out["captions"] == ["ein grüner Kreis"]
    assert (tmp_path / "out.txt").read_bytes() == "grün".encode()


def test_write_text_and_read_json(tmp_path):
    path = write_text(tmp_path / "s.json", '{"a": "ü"}\n')
    assert path.read_bytes() == '{"a": "ü"}\n'.encode()
    assert read_json(path) == {"a": "ü"}
    path.write_text('{"a": ')
    with pytest.raises(FileReadError, match=r"s.json: not valid JSON \(Expecting value"):
        read_json(path)
    assert read_text(write_text(tmp_path / "t.txt", "x\n")) == "x\n"


# ---------------------------------------------------------------------------------------------
# JSON Lines: a torn last line is dropped, any other damage names the file and line


@pytest.mark.parametrize(
    "data, rows, torn",
    [
        (b'{"step": 1}\n{"step": 2}\n', [1, 2], None),
        (b'{"step": 1}\n{"step": 2}', [1, 2], None),  # complete without its newline: kept
        (b'{"step": 1}\n{"step": 2, "kind": "tr', [1], '{"step": 2, "kind": "tr'),
        (b'{"step": 1}\n\x00\x00\x00\x00', [1], "\x00\x00\x00\x00"),  # power loss: zeros
        (b'{"step": 1}\n{"text": "\xc3', [1], '{"text": "\ufffd'),  # cut inside a character
        (b"", [], None),
        (BOM + b'{"step": 1}\n\n\n', [1], None),
        (b'{"step": 1}\n{"step": 2}{"step": 3', [1, 2], '{"step": 3'),  # glued: 2 kept
        (b'{"step": 1}\n{"step": 2} {"st', [1, 2], ' {"st'),
    ],
)
def test_json_lines_drop_only_a_torn_last_line(tmp_path, data, rows, torn):
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    log = read_json_lines(path)
    assert [value["step"] for _, value in log.rows] == rows
    assert log.torn_tail == torn


def test_json_lines_damage_before_the_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(FileReadError, match=r"m.jsonl:2: not valid JSON"):
        read_json_lines(path)
    path.write_bytes(b'{"step": 1}\n{"step": 2, "kind": "tr\n')  # torn, then a newline: damage
    with pytest.raises(FileReadError, match=r"m.jsonl:2: not valid JSON"):
        read_json_lines(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"a": "x', "Unterminated string starting at line 1 column 7"),
        ('{"a": "\x01"}', "Invalid control character at line 1 column 8"),
        ("{\n  ", "Expecting property name enclosed in double quotes at line 2 column 3"),
        ('{"a": 1} x', "Extra data at line 1 column 10"),
    ],
)
def test_json_errors_read_as_one_phrase(tmp_path, text, words):
    """json's own text may end with "at" ("Unterminated string starting at"): never "at at"."""
    path = tmp_path / "s.json"
    path.write_text(text)
    for read, error in ((read_json, FileReadError), (artifacts.read_json, DamagedFileError)):
        with pytest.raises(error) as err:
            read(path)
        assert words in str(err.value) and " at at " not in str(err.value)
    (tmp_path / "m.jsonl").write_text(text.replace("\n", " ") + "\n{}\n")
    with pytest.raises(FileReadError) as err:
        read_json_lines(tmp_path / "m.jsonl")
    assert "m.jsonl:1: not valid JSON" in str(err.value) and " at at " not in str(err.value)
