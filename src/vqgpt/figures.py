"""Pictures for humans: image grids, reconstruction and captioned grids, loss curves (PIL only).

Every writer saves a PNG atomically (temporary file + os.replace), so a viewer or a crash never
sees half a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from vqgpt.data.images import to_pil as image_to_pil

Images = Sequence[Image.Image] | Tensor  # PIL images, or (B, 3, H, W) in [-1, 1]
BLACK, WHITE, GREY = (0, 0, 0), (255, 255, 255), (200, 200, 200)
PALETTE = [  # matplotlib's tab10
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensor in [-1, 1] -> RGB PIL images (values outside the range are clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor in [-1, 1], got {tuple(images.shape)}")
    return [image_to_pil(x) for x in images]


def _as_pil(images: Images, scale: int) -> list[Image.Image]:
    pil = to_pil(images) if isinstance(images, Tensor) else [im.convert("RGB") for im in images]
    if not pil:
        raise ValueError("no images to draw")
    if len({im.size for im in pil}) != 1:
        raise ValueError(
            f"all images in a grid must have one size, got {sorted({im.size for im in pil})}"
        )
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:  # nearest neighbour keeps 64x64 tokens' blocks crisp
        pil = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in pil]
    return pil


def _tile(
    cells: Sequence[Image.Image | None], ncol: int, padding: int, background: tuple
) -> Image.Image:
    """Paste equal-sized cells row-major, `padding` px around each; None leaves a blank cell."""
    if ncol < 1:
        raise ValueError(f"ncol must be at least 1, got {ncol}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    w, h = next(c for c in cells if c is not None).size
    rows = math.ceil(len(cells) / ncol)
    cols = min(ncol, len(cells))
    grid = Image.new(
        "RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding), background
    )
    for i, cell in enumerate(cells):
        if cell is not None:
            row, col = divmod(i, ncol)
            grid.paste(cell, (padding + col * (w + padding), padding + row * (h + padding)))
    return grid


def _save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically: a temporary file beside `path`, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_reconstruction_grid(
    originals: Images,
    reconstructions: Images,
    path: str | Path,
    max_images: int = 16,
    scale: int = 2,
) -> Path:
    """PNG with up to `max_images` originals on the top row(s), their reconstructions below."""
    n = min(len(originals), max_images)
    if len(reconstructions) != len(originals):
        raise ValueError(
            f"{len(originals)} originals but {len(reconstructions)} reconstructions; "
            "pass matching batches"
        )
    top, bottom = _as_pil(originals[:n], scale), _as_pil(reconstructions[:n], scale)
    if top[0].size != bottom[0].size:
        raise ValueError(f"originals are {top[0].size} but reconstructions {bottom[0].size}")
    ncol = min(n, 8)
    blanks: list[Image.Image | None] = [None] * (math.ceil(n / ncol) * ncol - n)
    return _save_png(_tile([*top, *blanks, *bottom, *blanks], ncol, 2, BLACK), path)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; overlong words are split; a cut-off caption ends in '...'."""

    def fits(s: str) -> bool:
        return font.getlength(s) <= width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:
            cut = max((k for k in range(1, len(word)) if fits(word[:k])), default=1)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + "..."]
    return lines


def captioned_grid(
    images: Images,
    captions: Sequence[str],
    path: str | Path,
    ncol: int = 4,
    scale: int = 2,
    max_lines: int = 3,
) -> Path:
    """PNG grid with each image's caption (wrapped, at most `max_lines`) under its tile."""
    tiles = _as_pil(images, scale)
    if len(captions) != len(tiles):
        raise ValueError(f"{len(tiles)} images but {len(captions)} captions")
    font = _font()
    line_h = font.getbbox("Ag")[3] + 2
    w, h = tiles[0].size
    cells = []
    for tile, caption in zip(tiles, captions, strict=True):
        cell = Image.new("RGB", (w, h + max_lines * line_h + 4), WHITE)
        cell.paste(tile, (0, 0))
        draw = ImageDraw.Draw(cell)
        for i, line in enumerate(_wrap(caption, font, w - 2, max_lines)):
            draw.text((1, h + 2 + i * line_h), line, fill=BLACK, font=font)
        cells.append(cell)
    return _save_png(_tile(cells, ncol, 4, WHITE), path)


# ---------------------------------------------------------------------------------------------
# loss curves


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (800, 480),
) -> Path:
    """PNG line plot of named (step, value) series: axes, ticks, title, legend; non-finite skipped."""
    font = _font()
    width, height = size
    left, right, top, bottom = 70, 20, 36, 44
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = left, top, width - right, height - bottom  # plot area, y grows down
    draw.text((width / 2, 18), title, fill=BLACK, font=font, anchor="mm")
    draw.text(((x0 + x1) / 2, height - 12), "step", fill=BLACK, font=font, anchor="mm")

    clean = {
        name: [(float(s), float(v)) for s, v in pts if math.isfinite(s) and math.isfinite(v)]
        for name, pts in series.items()
    }
    points = [p for pts in clean.values() for p in pts]
    if not points:
        draw.rectangle((x0, y0, x1, y1), outline=BLACK)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no data", fill=BLACK, font=font, anchor="mm")
        return _save_png(image, path)
    sx = [p[0] for p in points]
    sy = [p[1] for p in points]
    lo_x, hi_x = min(sx), max(sx)
    lo_y, hi_y = min(sy), max(sy)
    if hi_x == lo_x:
        lo_x, hi_x = lo_x - 1, hi_x + 1
    pad = (hi_y - lo_y) * 0.05 or max(abs(hi_y) * 0.05, 1e-3)
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def px(s: float, v: float) -> tuple[float, float]:
        return (
            x0 + (s - lo_x) / (hi_x - lo_x) * (x1 - x0),
            y1 - (v - lo_y) / (hi_y - lo_y) * (y1 - y0),
        )

    for v in _nice_ticks(lo_y, hi_y):
        _, y = px(lo_x, v)
        draw.line((x0, y, x1, y), fill=GREY)
        draw.text((x0 - 6, y), f"{v:.4g}", fill=BLACK, font=font, anchor="rm")
    for s in _nice_ticks(lo_x, hi_x):
        x, _ = px(s, lo_y)
        draw.line((x, y1, x, y1 + 4), fill=BLACK)
        draw.text((x, y1 + 6), f"{s:.6g}", fill=BLACK, font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=BLACK)

    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(clean)}
    for name, pts in clean.items():
        xy = [px(s, v) for s, v in sorted(pts)]
        if len(xy) == 1:
            cx, cy = xy[0]
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colors[name])
        elif xy:
            draw.line(xy, fill=colors[name], width=2)

    line_h = font.getbbox("Ag")[3] + 4
    legend_w = max(font.getlength(name) for name in clean) + 28
    lx, ly = x1 - legend_w - 6, y0 + 6
    draw.rectangle((lx, ly, x1 - 6, ly + len(clean) * line_h + 4), fill=WHITE, outline=GREY)
    for i, name in enumerate(clean):
        ey = ly + 4 + i * line_h + line_h / 2
        draw.line((lx + 4, ey, lx + 20, ey), fill=colors[name], width=3)
        draw.text((lx + 24, ey), name, fill=BLACK, font=font, anchor="lm")
    return _save_png(image, path)


__all__ = [
    "captioned_grid",
    "plot_curves",
    "save_reconstruction_grid",
    "to_pil",
]
