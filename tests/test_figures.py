"""Grids: pixel sizes and tile placement; captions; loss-curve PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from vqgpt.figures import (
    PALETTE,
    _wrap,
    captioned_grid,
    plot_curves,
    save_reconstruction_grid,
    to_pil,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _solid(colors: list[tuple[int, int, int]], h: int, w: int) -> torch.Tensor:
    """(B, 3, h, w) in [-1, 1], image i filled with colors[i]."""
    rgb = torch.tensor(colors, dtype=torch.float32) / 127.5 - 1  # (B, 3)
    return rgb[:, :, None, None].expand(-1, -1, h, w).clone()


def _center(i: int, ncol: int, tile: tuple[int, int], padding: int) -> tuple[int, int]:
    row, col = divmod(i, ncol)
    w, h = tile
    return padding + col * (w + padding) + w // 2, padding + row * (h + padding) + h // 2


def test_to_pil_value_mapping() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    (im,) = to_pil(x)
    assert im.size == (4, 1) and im.mode == "RGB"
    assert [im.getpixel((i, 0))[0] for i in range(4)] == [0, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_pil(torch.zeros(3, 4, 4))


def test_grids_reject_mixed_sizes(tmp_path) -> None:
    with pytest.raises(ValueError, match="one size"):
        captioned_grid([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))], ["a", "b"], tmp_path)


def test_reconstruction_grid_originals_on_top(tmp_path) -> None:
    originals = _solid([(255, 0, 0)] * 3, 8, 8)
    recons = _solid([(0, 0, 255)] * 3, 8, 8)
    recons[1] = 1.0  # white, to check the pairing by column
    path = save_reconstruction_grid(originals, recons, tmp_path / "out" / "rec.png", max_images=2)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["rec.png"]
    grid = Image.open(path).convert("RGB")
    tile = (16, 16)  # default scale 2
    assert grid.size == (2 * 18 + 2, 2 * 18 + 2)
    assert grid.getpixel(_center(0, 2, tile, 2)) == (255, 0, 0)
    assert grid.getpixel(_center(1, 2, tile, 2)) == (255, 0, 0)
    assert grid.getpixel(_center(2, 2, tile, 2)) == (0, 0, 255)
    assert grid.getpixel(_center(3, 2, tile, 2)) == (255, 255, 255)
    with pytest.raises(ValueError, match="reconstructions"):
        save_reconstruction_grid(originals, recons[:2], tmp_path / "bad.png")


def test_reconstruction_grid_pads_rows_of_originals(tmp_path) -> None:
    originals = _solid([(255, 0, 0)] * 10, 4, 4)
    recons = _solid([(0, 255, 0)] * 10, 4, 4)
    grid = Image.open(save_reconstruction_grid(originals, recons, tmp_path / "r.png", scale=1))
    # 10 images in rows of 8: two rows of originals (second half empty), then two of recons
    assert grid.size == (8 * 6 + 2, 4 * 6 + 2)
    assert grid.convert("RGB").getpixel(_center(16, 8, (4, 4), 2)) == (0, 255, 0)
    assert grid.convert("RGB").getpixel(_center(15, 8, (4, 4), 2)) == (0, 0, 0)


def test_wrap_fits_width_and_truncates() -> None:
    font = ImageFont.load_default()
    text = "a red circle above a blue square " * 6 + "supercalifragilisticexpialidocious" * 2
    lines = _wrap(text, font, width=60, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 60 for line in lines)
    long_word = _wrap("x" * 80, font, width=60, max_lines=10)
    assert len(long_word) > 1 and "".join(long_word) == "x" * 80
    assert _wrap("short", font, width=60, max_lines=3) == ["short"]


def test_captioned_grid_draws_text_under_tiles(tmp_path) -> None:
    images = _solid(COLORS[:3], 16, 16)
    captions = ["red", "a long caption that must wrap onto a second line", ""]
    path = captioned_grid(images, captions, tmp_path / "cap.png", ncol=2, scale=2)
    grid = Image.open(path).convert("RGB")
    assert grid.width == 2 * (32 + 4) + 4 and grid.height > 2 * (32 + 4) + 4
    cell_h = (grid.height - 4) // 2 - 4

    def dark_pixels(x0: int, y0: int) -> int:
        box = np.asarray(grid.crop((x0, y0 + 32, x0 + 32, y0 + cell_h)), dtype=np.int64)
        return int((box.sum(axis=-1) < 200).sum())

    assert grid.getpixel((4 + 16, 4 + 16)) == COLORS[0]
    assert dark_pixels(4, 4) > 0  # "red"
    assert dark_pixels(40, 4) > dark_pixels(4, 4)  # wrapped long caption has more ink
    assert dark_pixels(4, 4 + cell_h + 4) == 0  # empty caption
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(images, ["one"], tmp_path / "bad.png")


def test_plot_curves_writes_png(tmp_path) -> None:
    series = {
        "train/loss": [(s, 1.0 / (s + 1)) for s in range(0, 200, 10)],
        "val/loss": [(0, 0.9), (100, float("nan")), (199, 0.2)],
        "lonely": [(50, 0.5)],
    }
    path = plot_curves(series, tmp_path / "curves.png", title="stage one")
    image = Image.open(path).convert("RGB")
    assert image.size == (800, 480)
    colors = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert set(PALETTE[:3]) <= colors
    assert PALETTE[3] not in colors
    empty = plot_curves({"none": []}, tmp_path / "empty.png", title="nothing yet")
    assert Image.open(empty).size == (800, 480)
