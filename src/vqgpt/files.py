"""Reading and writing the text files vqgpt and its users exchange: UTF-8, whatever the locale.

Every text vqgpt reads (recipes, prompt files, metadata.jsonl, the JSON state of a run) goes
through `read_text`: UTF-8 with a byte-order mark removed (editors on Windows write one), never
the locale's encoding, so a file reads the same on every machine. Every text it writes goes
through `write_text` (UTF-8, no BOM). JSON and JSON Lines read through `read_json` and
`read_json_lines`, whose errors name the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from vqgpt.errors import VqgptError

ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped


class FileReadError(VqgptError, ValueError):
    """A text, JSON or JSON Lines file that cannot be read: names the file (and line)."""


def decode(data: bytes, where: str) -> str:
    """`data` as UTF-8 text without a byte-order mark.

    Raises FileReadError naming `where` and the byte offset when `data` is not UTF-8.
    """
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as err:
        raise FileReadError(
            f"{where}: not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r}); "
            "save it as UTF-8"
        ) from None


def read_text(path: str | Path) -> str:
    """The text of `path`, read as UTF-8 with a byte-order mark removed.

    Raises FileNotFoundError when `path` does not exist, FileReadError when it is not UTF-8.
    """
    return decode(Path(path).read_bytes(), str(path))


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` as UTF-8 (no BOM, `\\n` line ends on every platform)."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return path


def json_error(err: json.JSONDecodeError, column_only: bool = False) -> str:
    """What `err` says and where, as one phrase: "Expecting value at line 3 column 1",
    "Unterminated string starting at line 1 column 22" (json's own text for some errors
    already ends with "at")."""
    where = f"column {err.colno}" if column_only else f"line {err.lineno} column {err.colno}"
    joint = " " if err.msg.endswith(" at") else " at "
    return f"{err.msg}{joint}{where}"


def read_json(path: str | Path) -> Any:
    """The JSON value in `path` (UTF-8, BOM removed).

    Raises FileNotFoundError when `path` does not exist, FileReadError naming the file, line and
    column when it is not UTF-8 or not JSON (a file cut short, edited by hand).
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileReadError(f"{path}: not valid JSON ({json_error(err)})") from None


class JsonLines(NamedTuple):
    """The records of a JSON Lines file."""

    rows: list[tuple[int, Any]]  # (line number from 1, value) of every non-blank line
    torn_tail: str | None  # a last line without its newline that did not parse, left out


def read_json_lines(path: str | Path) -> JsonLines:
    """Every record of the JSON Lines file `path` (UTF-8, BOM removed, blank lines skipped).

    A last line that lacks its newline and does not parse is a write cut short (disk full, power
    loss, a killed process): it is left out and returned as `torn_tail`, for the caller to warn
    about. A complete last line is kept, newline or not, and so is a complete record at the start
    of a torn last line (`{...}{"step": 9`: the rest is the torn tail).
    Raises FileNotFoundError when `path` does not exist, FileReadError naming the file and line
    for any other line that is not UTF-8 JSON.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    rows: list[tuple[int, Any]] = []
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)  # the bytes after the final newline (b"" when none)
        try:
            line = decode(raw, f"{path}:{number}")
            if not line.strip():
                continue
            rows.append((number, json.loads(line)))
        except (FileReadError, json.JSONDecodeError) as err:
            if last:
                torn = raw.decode("utf-8", errors="replace")
                # a complete record with the torn start of the next glued on (its newline was
                # lost): keep the record, drop the rest
                try:
                    value, end = json.JSONDecoder().raw_decode(torn)
                except json.JSONDecodeError:
                    return JsonLines(rows, torn_tail=torn)
                return JsonLines([*rows, (number, value)], torn_tail=torn[end:])
            if isinstance(err, FileReadError):
                raise
            raise FileReadError(
                f"{path}:{number}: not valid JSON ({json_error(err, column_only=True)})"
            ) from None
    return JsonLines(rows, torn_tail=None)


__all__ = [
    "ENCODING",
    "FileReadError",
    "JsonLines",
    "decode",
    "json_error",
    "read_json",
    "read_json_lines",
    "read_text",
    "write_text",
]
