"""The exported Space in a real browser, served by its own app.py in a process where vqgpt cannot
be imported: transformers + gradio only, the same tabs as `vqgpt app`.
"""

from __future__ import annotations

import base64

import pytest
import yaml
from PIL import Image, ImageDraw


@pytest.fixture(scope="module")
def space(start_space, exported):
    return start_space(exported)


def test_the_export_is_a_space(exported):
    assert (exported / "app.py").is_file() and (exported / "generation_vqgpt.py").is_file()
    requirements = (exported / "requirements.txt").read_text().split()
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in requirements}
    assert names == {"torch", "transformers", "gradio", "numpy", "pillow", "safetensors", "pyyaml"}
    meta = yaml.safe_load((exported / "README.md").read_text().split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"]


def test_space_draws_captions_and_edits_tokens_without_vqgpt(space, open_page, tmp_path):
    image = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(image).rectangle((8, 8, 30, 30), fill="blue")
    image.save(tmp_path / "square.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "square.png").read_bytes()[:60])

    app = open_page(space.url)
    assert "transformers" in app.wait_ready()
    app.draw("a small red circle", 3)  # CFG 1.5 by default: guided sampling
    assert app.gallery_images(3) == 3

    app.caption(tmp_path / "square.png", tmp_path / "broken.png")
    rows = app.page.locator("#captions tr")
    rows.nth(1).wait_for()
    assert rows.count() == 2 and "square.png" in rows.nth(1).inner_text()
    assert "broken.png: truncated" in app.wait_message("caption-status", "Skipped")

    app.tokenize(tmp_path / "square.png")
    cells = app.page.locator("#code-grid td")
    cells.nth(63).wait_for()
    old = int(cells.nth(0).get_attribute("data-code"))
    recon = app.image_src("recon")
    app.set_number("edit-code", (old + 5) % 32)
    app.page.locator("#edit-token").click()
    app.wait_message("token-status", f"code {old} -> {(old + 5) % 32}")
    edited = app.image_src("edited")
    fetch = app.page.request.get
    body = [
        base64.b64decode(s.split(",", 1)[1]) if s.startswith("data:") else fetch(s).body()
        for s in (recon, edited)
    ]
    assert body[0] != body[1]

    app.draw("", 1)
    assert "Error: empty prompt" in app.wait_message("draw-status", "empty prompt")
    app.tab("About")
    app.page.locator("#card").filter(has_text="Web app").wait_for()
