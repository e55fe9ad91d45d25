"""`vqgpt app` in a real browser: Chromium (Playwright) against the app on localhost, serving a
tiny trained pipeline. Each tab's action, each kind of bad input, a model folder missing a file,
and 8 concurrent requests (all complete, the server's memory back to its level before them).
"""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

MAX_PIXELS = 100_000  # the server's VQGPT_MAX_IMAGE_PIXELS: a 400x300 image is "huge"
MEMORY_SLACK = 15  # MB a warm round of 8 concurrent requests may leave (see the test)


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A PNG, a JPEG, a broken PNG (a cut-off file), a text file, an image over MAX_PIXELS."""
    folder = tmp_path_factory.mktemp("images")
    shape = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(shape).ellipse((8, 6, 36, 34), fill="red")
    shape.save(folder / "circle.png")
    shape.save(folder / "circle.jpg")
    data = (folder / "circle.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (400, 300), 128).save(folder / "huge.png")
    return {p.stem if p.suffix == ".png" else p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def broken_run(lm_run, tmp_path_factory) -> Path:
    """`lm_run` without its LM weights."""
    run = tmp_path_factory.mktemp("broken") / "run"
    shutil.copytree(lm_run / "final", run / "final")
    (run / "final" / "model.safetensors").unlink()
    return run


@pytest.fixture(scope="module")
def servers(start_app, lm_run, broken_run):
    """The app over `lm_run` (with a small pixel limit), and over the broken run."""
    good = start_app(lm_run, VQGPT_MAX_IMAGE_PIXELS=str(MAX_PIXELS))
    broken = start_app(broken_run)
    return good, broken


def decoded(src: str, page) -> bytes:
    """The bytes of an <img> source (a data URI or a URL the page can fetch)."""
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    return page.request.get(src).body()


def test_the_page_comes_up_at_once_and_says_when_the_model_is_ready(servers, open_page, lm_run):
    good, _ = servers
    assert good.up_after < 60  # s, on 2 busy cores: the model loads after the page is served
    app = open_page(good.url)
    assert "ready" in app.wait_ready()
    assert "8x8 codes of 32" in app.text("model-status")
    assert app.page.title() == f"vqgpt: {lm_run.name}"  # the folder's name, not its path


def test_text_to_image_shows_n_images_per_prompt_and_their_pngs(servers, open_page):
    app = open_page(servers[0].url)
    app.draw("a small red circle\na large blue square", 2)
    assert app.gallery_images(4) == 4
    app.wait_message("draw-status", "4 image(s)")
    links = app.page.locator("#pngs a")
    links.nth(3).wait_for()
    assert links.count() == 4 and "001_1" in app.text("pngs")
    png = app.page.request.get(links.nth(0).get_attribute("href")).body()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_prompts_get_a_message_and_the_app_goes_on(servers, open_page):
    app = open_page(servers[0].url)
    app.draw("   \n  ", 1)
    assert "Error: empty prompt" in app.wait_message("draw-status", "empty prompt")
    app.draw("a red circle " * 40, 1)  # longer than the model's t2i prefix (24 tokens)
    assert "Error: prompt 0 has" in app.wait_message("draw-status", "shorten the caption")
    app.draw("a red circle", 1)  # the app still works
    assert app.gallery_images(1) == 1


def test_caption_tab_captions_every_readable_upload(servers, open_page, images):
    app = open_page(servers[0].url)
    app.caption(images["circle"], images["circle.jpg"], images["broken"])
    rows = app.page.locator("#captions tr")
    rows.nth(2).wait_for()
    assert rows.count() == 3  # the header, two images
    assert "circle.png" in rows.nth(1).inner_text() and "circle.jpg" in rows.nth(2).inner_text()
    assert rows.nth(1).locator("img").get_attribute("src").startswith("data:image/png")
    assert "broken.png: truncated" in app.wait_message("caption-status", "Skipped")


def test_unreadable_huge_or_no_uploads_get_a_message(servers, open_page, images):
    app = open_page(servers[0].url)
    app.tab("Caption")
    app.page.locator("#caption-button").click()
    assert "Error: no file" in app.wait_message("caption-status", "no file")
    app.caption(images["notes"])
    assert "Error: no readable image" in app.wait_message("caption-status", "not an image")
    app.tokenize(images["huge"])
    message = app.wait_message("token-status", "too large")
    assert "too large: 400x300" in message and "VQGPT_MAX_IMAGE_PIXELS" in message


def test_tokens_tab_shows_the_code_map_and_an_edit_changes_the_image(servers, open_page, images):
    app = open_page(servers[0].url)
    app.tokenize(images["circle"])
    cells = app.page.locator("#code-grid td")
    cells.nth(63).wait_for()
    assert cells.count() == 64  # 8x8 codes
    assert "PSNR" in app.text("psnr") and "dB" in app.text("psnr")
    title = cells.nth(9).get_attribute("title")  # the id shown on hover
    assert title.startswith("row 1, col 1: code ")
    old = int(title.rsplit(" ", 1)[1])
    recon = decoded(app.image_src("recon"), app.page)
    app.set_number("edit-row", 1)
    app.set_number("edit-col", 1)
    app.set_number("edit-code", (old + 7) % 32)
    app.page.locator("#edit-token").click()
    assert f"code {old} -> {(old + 7) % 32}" in app.wait_message("token-status", "cell (1, 1)")
    edited = decoded(app.image_src("edited"), app.page)
    assert edited != recon
    assert Image.open(io.BytesIO(edited)).width >= 200  # enlarged from the model's 32 px
    assert cells.nth(9).get_attribute("title") == f"row 1, col 1: code {(old + 7) % 32}"
    app.set_number("edit-code", 32)  # outside the codebook
    app.page.locator("#edit-token").click()
    assert "Error: code 32" in app.wait_message("token-status", "outside the codebook [0, 32)")


def test_about_tab_shows_the_card(servers, open_page):
    app = open_page(servers[0].url)
    app.tab("About")
    app.page.locator("#card").filter(has_text="Token layout").wait_for()
    assert "No scores" in app.text("scores")  # this run has no `vqgpt eval` report


def test_a_model_folder_missing_a_file_still_serves_the_page_and_says_what_is_missing(
    servers, open_page
):
    app = open_page(servers[1].url)
    status = app.wait_ready()
    assert "error" in status and "model.safetensors is missing" in status
    app.draw("a red circle", 1)
    assert "Error: the model" in app.wait_message("draw-status", "could not be loaded")


def eight_requests(pages, pid: int) -> tuple[float, float, float]:
    """Draw on every page at once (4 images each); all complete without an error. RSS MB
    (before, peak, after): before once the pages are up, after 2 s past the last result (the
    server releases memory once idle for 0.5 s: `Janitor`)."""
    time.sleep(2)
    before = rss_mb(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for k, page in enumerate(pages):
            page.locator("#prompts textarea").fill(f"a small red circle number {k}")
            page.locator("#draw").click()
        for page in pages:
            page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4")
            assert "Error" not in page.locator("#draw-status").inner_text()
    finally:
        done.set()
        sampler.join()
    time.sleep(2)
    return before, max(peak), rss_mb(pid)


def test_eight_concurrent_requests_complete_and_memory_returns(servers, browser):
    server = servers[0]
    contexts = [browser.new_context() for _ in range(8)]
    pages = [context.new_page() for context in contexts]
    try:
        rounds = []
        # a warm-up round (first-use allocations, caches), then measured rounds: a second one
        # only if the first left more than the slack (heap fragments swing a round by +-10 MB
        # on a loaded machine; a leak leaves its ~20 MB every round, and fails both)
        for _ in range(3):
            for page in pages:  # fresh pages: empty galleries, new sessions
                page.set_default_timeout(120_000)
                page.goto(server.url)
                page.wait_for_selector("#model-status")
            rounds.append(eight_requests(pages, server.pid))
            if len(rounds) > 1 and rounds[-1][2] - rounds[-1][0] < MEMORY_SLACK:
                break
    finally:
        for context in contexts:
            context.close()
    print(f"RSS MB (before, peak, after): warm-up {rounds[0]}, measured {rounds[1:]}")
    # Once warm, a round leaves little: Gradio's 8 new sessions (~90 KB each) and heap fragments.
    # Measured here (MB, warm-up / warm round after minus before): with the idle release (gc +
    # malloc_trim, `Janitor`) -6 / +8; without it +51 / +19, which fails.
    assert any(after - before < MEMORY_SLACK for before, _, after in rounds[1:]), rounds
