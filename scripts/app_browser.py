"""What the app scripts share: `vqgpt app` in a subprocess, and a headless Debian Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("VQGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_server(model: str, timeout: float = 120.0):
    """(url, process, seconds until the page was served) of `vqgpt app --model MODEL`."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "vqgpt.cli", "app", "--model", model, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url, started = f"http://127.0.0.1:{port}/", time.monotonic()
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() - started > timeout:
                    raise SystemExit(f"the app did not come up (exit {proc.poll()})") from None
                time.sleep(0.25)
        yield url, proc, time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def chromium():
    """A headless Chromium (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"no chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_ready(page) -> None:
    """Until the model status says the model is loaded (or failed)."""
    page.wait_for_function(
        "() => { const s = document.querySelector('#model-status');"
        " return s && !s.innerText.includes('loading'); }",
        timeout=300_000,
    )


def rss_mb(pid: int) -> float:
    """VmRSS of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")
