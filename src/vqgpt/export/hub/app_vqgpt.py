"""The vqgpt web app (Gradio): text to image, captions, the code grid of an image, the model's card.

Self-contained (imports gradio, numpy, PIL and torch only), and the one implementation of the UI:
`vqgpt app` serves it over vqgpt's own pipeline (`vqgpt.app`), and an export's Space runs this
file as its `app.py` over the exported folder with plain transformers (`generation_vqgpt.py`,
copied beside it). Both hand `build_app` a function that loads a *backend*, an object with:

    describe() -> str                               one line: sizes, grid, codebook
    read_image(path) -> (PIL RGB image | None, why)  never raises on bad files
    draw(prompts, n, DrawOptions) -> [PIL]          n images per prompt, prompt-major
    caption(images, CaptionOptions) -> [str]        one caption per RGB image
    encode(image) -> (model input PIL, codes [h, w] LongTensor)
    decode(codes [h, w]) -> PIL                     the image tokenizer's reconstruction
    scores() -> [(name, value)], card() -> str      the About tab

The model loads once, in a background thread started with the app (`ModelSlot`), so the page is
up at once and shows "loading model..." until it is ready; every request after that shares it.
Requests queue with a concurrency limit. A handler never lets an exception reach the page: a bad
input or a broken model folder becomes a one-line message in the tab's status (`Message`).
"""

from __future__ import annotations

import base64
import gc
import html
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

LOADING, READY, FAILED = "loading model...", "ready", "error"
THUMBNAIL = 96  # px, the longer side of a caption tab thumbnail
MAX_PROMPTS = 16  # prompts per request (one per line)
MAX_IMAGES = 64  # images per request, drawn or captioned
# Gradio keeps every browser session's state (~90 KB each, even after the page closed) until
# this many newer sessions push it out: its default, 10000, would hold ~0.9 GB
SESSIONS = 1000
FILES_AGE = 3600  # s: PNGs and uploads older than this are deleted (checked as often)
GRID_CELL = 22  # px, one code of the code map
IMAGE_HEIGHT = 256  # px, the Tokens tab's images (a 64 px input shown large)


class Message(Exception):  # noqa: N818 (what the page shows, not an error class of vqgpt)
    """A one-line message for the page instead of a result."""


@dataclass
class DrawOptions:
    """Text-to-image sampling."""

    cfg_scale: float = 1.5  # classifier-free guidance; 1 = off
    temperature: float = 0.5
    top_k: int = 0  # 0 = off
    seed: int = 0  # prompt k draws with seed + k
    rerank: int = 1  # best of N by the LM's own caption likelihood; 1 = off


@dataclass
class CaptionOptions:
    """How captions are decoded."""

    mode: str = "greedy"  # "greedy" | "beam" | "rerank"
    beams: int = 4  # mode "beam"
    rerank: int = 8  # mode "rerank": the greedy caption + N - 1 samples, best kept


class ModelSlot:
    """One model for the whole app, loaded in a background thread; `get` waits for it."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._done = threading.Event()
        self.backend: Any = None
        self.error: str | None = None
        threading.Thread(target=self._run, name="vqgpt-model-load", daemon=True).start()

    def _run(self) -> None:
        try:
            self.backend = self._load()
        except Exception as err:  # a broken folder: the page says why and stays up
            self.error = one_line(err)
        finally:
            self._done.set()

    @property
    def state(self) -> str:
        """LOADING, READY or FAILED."""
        if not self._done.is_set():
            return LOADING
        return FAILED if self.error else READY

    def status(self) -> str:
        """The Markdown line the page shows about the model."""
        state = self.state
        if state == LOADING:
            return f"**Model:** {LOADING}"
        if state == FAILED:
            return f"**Model:** error: {self.error}"
        return f"**Model:** ready ({self.backend.describe()})"

    def get(self) -> Any:
        """The backend (waiting while it loads); a Message when it failed to load."""
        self._done.wait()
        if self.error:
            raise Message(f"the model could not be loaded: {self.error}")
        return self.backend


def one_line(err: BaseException) -> str:
    """An exception as the one line a user reads (no traceback, no type for plain messages)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (Message, ValueError, OSError)) else f"{type(err).__name__}: {text}"  # fmt: skip


def release_memory() -> None:
    """Collect cyclic garbage, then hand freed heap back to the system (glibc keeps it in its
    per-thread arenas otherwise: the server's RSS would stay at the peak of its busiest moment)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Janitor:
    """Releases memory (`release_memory`) once the server is idle: `quiet` seconds after the last
    running request ended with none started since. Not in the request itself: Gradio encodes and
    caches a handler's outputs after it returns, and a full collection takes a while."""

    def __init__(self, quiet: float = 0.5) -> None:
        self.quiet = quiet
        self.runs = 0  # releases so far
        self._active = 0
        self._lock = threading.Lock()
        self._ended = threading.Event()
        threading.Thread(target=self._run, name="vqgpt-janitor", daemon=True).start()

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._ended.set()

    def _run(self) -> None:
        while True:
            self._ended.wait()
            time.sleep(self.quiet)
            with self._lock:
                self._ended.clear()
                if self._active:  # busy again: its end sets the event
                    continue
            release_memory()
            self.runs += 1


def _error(err: BaseException) -> str:
    return f"**Error:** {html.escape(one_line(err))}"


# ---------------------------------------------------------------------------------------------
# pictures


def to_data_uri(image: Image.Image, size: int | None = None) -> str:
    """A PNG data URI of `image` (its longer side scaled to `size` when given)."""
    if size is not None:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def code_colour(code: int) -> str:
    """A stable colour per code id (golden-ratio hues), as #rrggbb."""
    hue = (code * 0.61803398875) % 1.0
    light = 0.45 + 0.2 * ((code * 7) % 3) / 2  # neighbours in hue differ in lightness too
    rgb = _hls_to_rgb(hue, light, 0.65)
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _hls_to_rgb(h: float, lightness: float, s: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hls_to_rgb(h, lightness, s)


def code_grid_html(codes: torch.Tensor, mark: tuple[int, int] | None = None) -> str:
    """Codes [h, w] as a coloured table; hovering a cell shows its row, column and code id."""
    rows = []
    for r, row in enumerate(codes.tolist()):
        cells = []
        for c, code in enumerate(row):
            edge = "outline:2px solid #000;" if mark == (r, c) else ""
            cells.append(
                f'<td title="row {r}, col {c}: code {code}" data-code="{code}" '
                f'style="background:{code_colour(code)};{edge}"></td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    style = (
        f"<style>#code-grid td{{width:{GRID_CELL}px;height:{GRID_CELL}px;padding:0;border:0}}"
        "#code-grid table{border-collapse:collapse;width:auto}</style>"
    )
    return f'{style}<div id="code-grid"><table>{"".join(rows)}</table></div>'


def enlarge(image: Image.Image, size: int = IMAGE_HEIGHT) -> Image.Image:
    """`image` scaled up by a whole factor to about `size` px, nearest neighbour: a 64 px image
    shown large with its pixels sharp."""
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two RGB images of one size (8-bit pixels, peak 255; identical: 100)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 100.0 if mse < 1e-10 else 10.0 * float(np.log10(255.0**2 / mse))


def _paths(files: Any) -> list[str]:
    """Uploaded files (paths or objects with `.name`) as paths; none is a Message."""
    files = [] if files is None else (files if isinstance(files, list) else [files])
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]
    if not paths:
        raise Message("no file: upload an image first")
    return paths


# ---------------------------------------------------------------------------------------------
# the tabs' handlers (plain functions of a slot: tested without a browser)


def prune(out_root: Path, age: float) -> None:
    """Delete the request folders under `out_root` older than `age` seconds (Gradio serves its
    own copies of the PNGs, and deletes those as old as that too: `delete_cache`)."""
    now = time.time()
    for folder in out_root.glob("draw_*"):
        try:
            if now - folder.stat().st_mtime > age:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # another request pruned it
            pass


def read_prompts(text: str | None) -> list[str]:
    """One prompt per line, blank lines dropped; none, or too many, is a Message."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise Message("empty prompt: type a caption (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise Message(f"{len(prompts)} prompts: at most {MAX_PROMPTS} per request")
    return prompts


def draw(
    slot: ModelSlot,
    prompts_text: str,
    n: int,
    options: DrawOptions,
    out_root: Path,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """(gallery items (image, prompt), PNG paths) for each prompt's `n` images."""
    prompts = read_prompts(prompts_text)
    n = int(n)
    if not 1 <= n * len(prompts) <= MAX_IMAGES:
        raise Message(f"{n} images for {len(prompts)} prompts: 1 to {MAX_IMAGES} per request")
    backend = slot.get()
    prune(out_root, FILES_AGE)
    folder = Path(tempfile.mkdtemp(prefix="draw_", dir=out_root))
    gallery, files = [], []
    for k, prompt in enumerate(prompts):
        if progress is not None:
            progress(k / len(prompts), f"prompt {k + 1} of {len(prompts)}")
        opts = DrawOptions(**{**options.__dict__, "seed": int(options.seed) + k})
        for j, image in enumerate(backend.draw([prompt], n, opts)):
            path = folder / f"{k:03d}_{j}.png"
            image.save(path)
            gallery.append((image, prompt))
            files.append(str(path))
    return gallery, files


def caption(
    slot: ModelSlot, files: Any, options: CaptionOptions
) -> tuple[str, list[str]]:  # fmt: skip
    """(an HTML table: thumbnail, file, caption; the files that could not be read and why)."""
    paths = _paths(files)
    if len(paths) > MAX_IMAGES:
        raise Message(f"{len(paths)} files: at most {MAX_IMAGES} per request")
    backend = slot.get()
    good, images, skipped = [], [], []
    for path in paths:
        image, why = backend.read_image(path)
        if image is None:
            skipped.append(f"{Path(path).name}: {why}")
        else:
            good.append(path)
            images.append(image)
    if not images:
        raise Message("no readable image: " + "; ".join(skipped))
    captions = backend.caption(images, options)
    rows = [
        f'<tr><td><img src="{to_data_uri(im, THUMBNAIL)}" alt="{html.escape(Path(p).name)}"></td>'
        f"<td>{html.escape(Path(p).name)}</td>"
        f'<td class="caption">{html.escape(text)}</td></tr>'
        for p, im, text in zip(good, images, captions, strict=True)
    ]
    table = (
        '<table id="captions"><tr><th>image</th><th>file</th><th>caption</th></tr>'
        + "".join(rows)
        + "</table>"
    )
    return table, skipped


@dataclass
class Tokens:
    """What the Tokens tab shows of one image."""

    original: Image.Image  # the model's input (resized, centre-cropped)
    reconstruction: Image.Image
    codes: torch.Tensor  # [h, w]
    psnr: float  # dB, reconstruction against original


def tokenize(slot: ModelSlot, files: Any) -> Tokens:
    """An uploaded image's codes, reconstruction and PSNR."""
    paths = _paths(files)
    backend = slot.get()
    image, why = backend.read_image(paths[0])
    if image is None:
        raise Message(f"{Path(paths[0]).name}: {why}")
    original, codes = backend.encode(image)
    reconstruction = backend.decode(codes)
    return Tokens(original, reconstruction, codes, psnr(original, reconstruction))


def edit_token(
    slot: ModelSlot, codes: list | None, row: Any, col: Any, code: Any
) -> tuple[torch.Tensor, Image.Image, int]:
    """(the codes with cell (row, col) set to `code`, their decoded image, the code replaced)."""
    if codes is None:
        raise Message("no image: upload one and press Tokenize first")
    backend = slot.get()
    grid = torch.tensor(codes, dtype=torch.long)
    h, w = grid.shape
    values = {"row": row, "col": col, "code": code}
    if any(v is None or float(v) != int(v) for v in values.values()):
        raise Message("row, column and code must be whole numbers")
    row, col, code = int(row), int(col), int(code)
    if not (0 <= row < h and 0 <= col < w):
        raise Message(f"cell ({row}, {col}) is outside the {h}x{w} code grid")
    if not 0 <= code < backend.codebook_size:
        raise Message(f"code {code} is outside the codebook [0, {backend.codebook_size})")
    old = int(grid[row, col])
    grid[row, col] = code
    return grid, backend.decode(grid), old


def scores_markdown(rows: list[tuple[str, float]]) -> str:
    """The run's scores as a Markdown table."""
    if not rows:
        return "No scores: this run has no evaluation report (`vqgpt eval`)."
    return "| score | value |\n|---|---|\n" + "\n".join(f"| {n} | {v:g} |" for n, v in rows)


def strip_front_matter(card: str) -> str:
    """A model card without its YAML metadata block."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


# ---------------------------------------------------------------------------------------------
# the page


def build_app(
    load: Callable[[], Any], title: str = "vqgpt", concurrency: int = 2
) -> tuple[gr.Blocks, ModelSlot, Path]:
    """(the Gradio app, its model slot, the folder its PNGs go to): the model starts loading now."""
    slot = ModelSlot(load)
    out_root = Path(tempfile.mkdtemp(prefix="vqgpt_app_"))
    janitor = Janitor()

    def guarded(fn: Callable, n_outputs: int) -> Callable:
        """`fn`'s n_outputs outputs and its status line; an exception leaves the outputs as they
        are and puts its one line in the status."""

        def run(*args, **kwargs):
            janitor.begin()
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                return (*([gr.skip()] * n_outputs), _error(err))
            finally:
                janitor.end()

        return run

    with gr.Blocks(
        title=title, analytics_enabled=False, delete_cache=(FILES_AGE, FILES_AGE)
    ) as demo:
        gr.Markdown(f"# {html.escape(title)}\nImages and text in one token stream (vqgpt).")
        status = gr.Markdown(slot.status(), elem_id="model-status")
        timer = gr.Timer(1.0)
        timer.tick(lambda: (slot.status(), gr.Timer(active=slot.state == LOADING)), None, [status, timer])  # fmt: skip

        with gr.Tab("Text to image", id="t2i"):
            prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts")
            with gr.Row():
                n = gr.Slider(1, 8, value=4, step=1, label="Images per prompt", elem_id="n")
                cfg = gr.Slider(0, 5, value=1.5, step=0.1, label="CFG scale")
                temperature = gr.Slider(0.05, 2, value=0.5, step=0.05, label="Temperature")
            with gr.Row():
                top_k = gr.Number(0, label="Top-k (0 = off)", precision=0)
                seed = gr.Number(0, label="Seed", precision=0)
                rerank = gr.Slider(1, 16, value=1, step=1, label="Best of N (rerank)")
            draw_button = gr.Button("Draw", variant="primary", elem_id="draw")
            draw_status = gr.Markdown(elem_id="draw-status")
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")
            pngs = gr.File(label="PNGs", file_count="multiple", elem_id="pngs")

            def on_draw(text, n, cfg, temperature, top_k, seed, rerank, progress=gr.Progress()):  # noqa: B008
                opts = DrawOptions(float(cfg), float(temperature), int(top_k or 0), int(seed or 0), int(rerank))  # fmt: skip
                gallery, files = draw(
                    slot, text, n, opts, out_root, lambda f, d: progress(f, desc=d)
                )
                return gallery, files, f"{len(files)} image(s)"

            draw_button.click(
                guarded(on_draw, 2),
                [prompts, n, cfg, temperature, top_k, seed, rerank],
                [gallery, pngs, draw_status],
            )

        with gr.Tab("Caption", id="caption"):
            caption_files = gr.File(
                label="Images (one or many)", file_count="multiple", elem_id="caption-files"
            )
            with gr.Row():
                mode = gr.Radio(["greedy", "beam", "rerank"], value="greedy", label="Decoding")
                beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam)")
                caption_rerank = gr.Slider(2, 16, value=8, step=1, label="Candidates (rerank)")
            caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            caption_status = gr.Markdown(elem_id="caption-status")
            captions = gr.HTML(elem_id="caption-table")

            def on_caption(files, mode, beams, rerank):
                table, skipped = caption(slot, files, CaptionOptions(mode, int(beams), int(rerank)))
                note = "**Skipped:** " + html.escape("; ".join(skipped)) if skipped else ""
                return table, note

            caption_button.click(
                guarded(on_caption, 1),
                [caption_files, mode, beams, caption_rerank],
                [captions, caption_status],
            )

        with gr.Tab("Tokens", id="tokens"):
            token_file = gr.File(label="Image", file_count="single", elem_id="token-file")
            tokenize_button = gr.Button("Tokenize", variant="primary", elem_id="tokenize")
            token_status = gr.Markdown(elem_id="token-status")
            with gr.Row():
                shown = dict(type="pil", format="png", height=IMAGE_HEIGHT)
                original = gr.Image(label="Input (as the model sees it)", **shown)
                recon = gr.Image(label="Reconstruction", elem_id="recon", **shown)
                edited = gr.Image(label="Edited", elem_id="edited", **shown)
            psnr_text = gr.Markdown(elem_id="psnr")
            grid_html = gr.HTML(elem_id="code-map")
            codes_state = gr.State(None)
            with gr.Row():
                edit_row = gr.Number(0, label="Row", precision=0, elem_id="edit-row")
                edit_col = gr.Number(0, label="Column", precision=0, elem_id="edit-col")
                edit_code = gr.Number(0, label="Code", precision=0, elem_id="edit-code")
                edit_button = gr.Button("Edit token", elem_id="edit-token")

            def on_tokenize(files):
                t = tokenize(slot, files)
                h, w = t.codes.shape
                text = f"**PSNR:** {t.psnr:.2f} dB &nbsp; **codes:** {h}x{w}"
                grid = code_grid_html(t.codes)
                big = enlarge(t.original), enlarge(t.reconstruction)
                return *big, None, text, grid, t.codes.tolist(), ""

            tokenize_button.click(
                guarded(on_tokenize, 6),
                [token_file],
                [original, recon, edited, psnr_text, grid_html, codes_state, token_status],
            )

            def on_edit(codes, row, col, code):
                grid, image, old = edit_token(slot, codes, row, col, code)
                r, c = int(row), int(col)
                note = f"cell ({r}, {c}): code {old} -> {int(code)}"
                return enlarge(image), code_grid_html(grid, (r, c)), grid.tolist(), note

            edit_button.click(
                guarded(on_edit, 3),
                [codes_state, edit_row, edit_col, edit_code],
                [edited, grid_html, codes_state, token_status],
            )

        with gr.Tab("About", id="about") as about_tab:
            about_status = gr.Markdown(elem_id="about-status")
            scores = gr.Markdown(elem_id="scores")
            card = gr.Markdown(elem_id="card")

            def on_about():
                backend = slot.get()
                table = "## Scores\n\n" + scores_markdown(backend.scores())
                return table, strip_front_matter(backend.card()), ""

            about_tab.select(guarded(on_about, 2), None, [scores, card, about_status])

    demo.queue(default_concurrency_limit=concurrency)
    return demo, slot, out_root


def launch(
    demo: gr.Blocks, out_root: Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True
) -> None:
    """Serve the app (no share link, no analytics)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        allowed_paths=[str(out_root)],
        prevent_thread_lock=not block,
        state_session_capacity=SESSIONS,
        quiet=True,
        footer_links=[],
    )


def main() -> None:
    """The Space: serve the exported folder this file lies in (or VQGPT_MODEL) with transformers."""
    from generation_vqgpt import TransformersBackend  # copied beside this file as app.py

    folder = os.environ.get("VQGPT_MODEL") or str(Path(__file__).resolve().parent)
    demo, _, out_root = build_app(lambda: TransformersBackend.load(folder), Path(folder).name)
    host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")
    launch(demo, out_root, host, int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
