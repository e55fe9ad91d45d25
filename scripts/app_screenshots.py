"""One screenshot per tab of `vqgpt app`, each after the tab's action (for the README).

    python scripts/app_screenshots.py --model runs/demo9/lm --image some.png --out docs/images/

Writes app_t2i.png, app_caption.png, app_tokens.png, app_about.png (1200 px wide, palette PNGs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from app_browser import app_server, chromium, wait_ready
from PIL import Image

PROMPTS = "a large red circle at the top left\na small blue square at the bottom right"


def shrink(path: Path) -> None:
    """A 256-colour optimized PNG: screenshots of flat UI compress ~4x."""
    image = Image.open(path).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def visible_edit(page, image: str) -> tuple[int, int, int]:
    """(row, col, code) of an edit one can see: the cell most unlike the image's median colour
    (on the shape) given the code of the background cell nearest it (a piece of shape erased)."""
    codes = page.evaluate(
        "() => [...document.querySelectorAll('#code-grid tr')]"
        ".map(tr => [...tr.querySelectorAll('td')].map(td => +td.dataset.code))"
    )
    h, w = len(codes), len(codes[0])
    cells = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.Resampling.BOX))
    far = np.linalg.norm(cells - np.median(cells.reshape(-1, 3), axis=0), axis=-1)  # [h, w]
    shape = np.unravel_index(int(far.argmax()), far.shape)
    background = [(r, c) for r in range(h) for c in range(w) if far[r, c] < far.max() / 4]
    r, c = min(background, key=lambda rc: (rc[0] - shape[0]) ** 2 + (rc[1] - shape[1]) ** 2)
    return int(shape[0]), int(shape[1]), codes[r][c]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True, action="append", help="an image to caption / tokenize")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with app_server(args.model) as (url, _, _), chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(url)
        wait_ready(page)

        page.locator("#prompts textarea").fill(PROMPTS)
        page.locator("#draw").click()
        page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 8")
        page.wait_for_timeout(500)
        page.screenshot(path=out / "app_t2i.png", full_page=True)

        page.get_by_role("tab", name="Caption").click()
        page.locator("#caption-files input[type=file]").set_input_files(args.image)
        page.wait_for_timeout(1000)
        page.locator("#caption-button").click()
        page.locator("#captions tr").nth(len(args.image)).wait_for()
        page.screenshot(path=out / "app_caption.png", full_page=True)

        page.get_by_role("tab", name="Tokens").click()
        page.locator("#token-file input[type=file]").set_input_files(args.image[0])
        page.wait_for_timeout(1000)
        page.locator("#tokenize").click()
        page.locator("#code-grid td").first.wait_for()
        row, col, code = visible_edit(page, args.image[0])
        for elem_id, value in (("edit-row", row), ("edit-col", col), ("edit-code", code)):
            box = page.locator(f"#{elem_id} input[type=number]").first
            box.fill(str(value))
            box.press("Tab")
        page.locator("#edit-token").click()
        page.locator("#token-status").filter(has_text=f"cell ({row}, {col})").wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=out / "app_tokens.png", full_page=True)

        page.get_by_role("tab", name="About").click()
        page.locator("#scores table").wait_for()
        page.screenshot(path=out / "app_about.png")
    for name in ("app_t2i", "app_caption", "app_tokens", "app_about"):
        shrink(out / f"{name}.png")
        print(out / f"{name}.png", (out / f"{name}.png").stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
