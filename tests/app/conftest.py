"""The web app's browser tests: Debian's Chromium driven by Playwright against servers on
localhost, each started once per module in a subprocess on a free port.

Without chromium or playwright here the browser tests skip, saying so; under CI (the `CI`
environment variable set) their absence is a failure: `.ci/run` installs both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("VQGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",  # else this closed network refuses its connections
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
APP_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1"}
START_TIMEOUT = 90  # s until the page is served (its import of gradio and torch on busy cores)
ACTION_TIMEOUT = 60_000  # ms a page waits for a result


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (Playwright's sync API), shared by every browser test."""
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the browser tests, but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class Server:
    """A web app in a subprocess: its URL, its process, how long the page took to come up."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.log = log
        started = time.monotonic()
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - started > START_TIMEOUT:
                self.stop()
                raise AssertionError(f"the app did not come up:\n{log.read_text()[-5000:]}")
            time.sleep(0.25)
        self.up_after = time.monotonic() - started  # s

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _app_env(cli_env: Callable, **extra: str) -> dict:
    env = cli_env()
    env.update(APP_ENV, **extra)
    return env


@pytest.fixture(scope="module")
def start_app(cli_env, free_port, tmp_path_factory):
    """(model, **env) -> a `vqgpt app --model MODEL` Server (stopped after the module)."""
    servers = []

    def start(model: str | Path, **env: str) -> Server:
        port = free_port()
        cmd = [sys.executable, "-m", "vqgpt.cli", "app", "--model", str(model), "--port", str(port)]
        log = tmp_path_factory.mktemp("app") / "server.log"
        servers.append(Server(cmd, _app_env(cli_env, **env), log.parent, port, log))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


SPACE = """
import runpy, sys
folder = sys.argv[1]
sys.path.insert(0, folder)  # app.py imports its siblings, as a Space runs it
runpy.run_path(folder + "/app.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def start_space(without_vqgpt, free_port, tmp_path_factory):
    """(export folder) -> a Server running its Space (`python app.py`) with vqgpt blocked."""
    servers = []

    def start(export: Path) -> Server:
        tmp = tmp_path_factory.mktemp("space")
        folder = tmp / "model"  # the guard drops every sys.path entry naming vqgpt
        shutil.copytree(export, folder)
        cmd, env, cwd = without_vqgpt(SPACE, tmp, str(folder))
        port = free_port()
        env.update(APP_ENV, GRADIO_SERVER_PORT=str(port))
        servers.append(Server(cmd, env, cwd, port, tmp / "server.log"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


class AppPage:
    """One browser page on the app, and what a user does on each tab."""

    def __init__(self, page, url: str) -> None:
        self.page = page
        page.set_default_timeout(ACTION_TIMEOUT)
        page.goto(url)
        page.wait_for_selector("#model-status")

    def text(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").inner_text()

    def wait_ready(self) -> str:
        """The model status once it left 'loading model...'."""
        status = self.page.locator("#model-status")
        status.filter(has_not_text="loading model").wait_for()
        self.page.wait_for_function(
            "() => !document.querySelector('#model-status').innerText.includes('loading')"
        )
        return status.inner_text()

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def wait_message(self, elem_id: str, words: str) -> str:
        box = self.page.locator(f"#{elem_id}")
        box.filter(has_text=words).wait_for()
        return box.inner_text()

    def set_number(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]").first
        box.fill(str(value))
        box.press("Tab")

    def draw(self, prompts: str, n: int) -> None:
        """Type the prompts, choose n images per prompt, press Draw."""
        self.tab("Text to image")
        self.page.locator("#prompts textarea").fill(prompts)
        self.set_number("n", n)
        self.page.locator("#draw").click()

    def gallery_images(self, count: int) -> int:
        """Waits for `count` images in the gallery; the number there."""
        images = self.page.locator("#gallery img")
        self.page.wait_for_function(
            f"() => document.querySelectorAll('#gallery img').length >= {count}"
        )
        return images.count()

    def upload(self, elem_id: str, *files: Path) -> None:
        self.page.locator(f"#{elem_id} input[type=file]").set_input_files([str(f) for f in files])
        # the upload ends with the file's name shown in the component
        self.page.locator(f"#{elem_id}").filter(has_text=Path(files[-1]).stem).wait_for()

    def caption(self, *files: Path) -> None:
        self.tab("Caption")
        self.upload("caption-files", *files)
        self.page.locator("#caption-button").click()

    def tokenize(self, file: Path) -> None:
        self.tab("Tokens")
        self.upload("token-file", file)
        self.page.locator("#tokenize").click()

    def image_src(self, elem_id: str) -> str:
        img = self.page.locator(f"#{elem_id} img").first
        img.wait_for()
        return img.get_attribute("src")


@pytest.fixture(scope="module")
def open_page(browser):
    """(url) -> an AppPage in a fresh browser context (closed after the module)."""
    contexts = []

    def open_(url: str) -> AppPage:
        contexts.append(browser.new_context(viewport={"width": 1200, "height": 900}))
        return AppPage(contexts[-1].new_page(), url)

    yield open_
    for context in contexts:
        context.close()
