"""`vqgpt app` without a browser: the missing-gradio message, the model slot's states."""

from __future__ import annotations

import sys
import threading

import pytest


def test_app_without_gradio_says_how_to_get_it(cli_in_process, error_line, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = cli_in_process("app", "--model", "runs/x", check=False)
    assert error_line(result, "app").endswith('pip install "vqgpt[app]"')


def test_model_slot_loads_in_the_background_and_reports_failures():
    pytest.importorskip("gradio")
    from vqgpt.export.hub.app_vqgpt import LOADING, READY, Message, ModelSlot

    gate = threading.Event()

    class Backend:
        def describe(self) -> str:
            return "tiny"

    slot = ModelSlot(lambda: gate.wait() and Backend())
    assert slot.state == LOADING and "loading model..." in slot.status()
    gate.set()
    assert slot.get().describe() == "tiny" and slot.state == READY

    def fail():
        raise FileNotFoundError("run/final: model.safetensors is missing")

    broken = ModelSlot(fail)
    with pytest.raises(Message, match="could not be loaded: run/final: model.safetensors"):
        broken.get()
    assert "error: run/final: model.safetensors is missing" in broken.status()
