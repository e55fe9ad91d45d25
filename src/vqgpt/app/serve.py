"""`vqgpt app`: serve the web app over a run, an export or a Hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vqgpt.errors import VqgptError

INSTALL_HINT = 'the web app needs gradio: pip install "vqgpt[app]"'


class AppError(VqgptError, RuntimeError):
    """The app cannot start (gradio missing)."""


@dataclass
class AppConfig:
    """What to serve, where."""

    model: str  # a run folder, its final/, an export folder, or a Hub id (org/name)
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 2  # requests decoded at once; the rest wait in the queue


def model_name(model: str) -> str:
    """What the page calls the model: a Hub id as it is, a local folder by its name (a run's
    final/ by the run's), never a local path."""
    path = Path(model)
    if not path.exists():
        return model
    path = path.resolve()
    return path.parent.name if path.name == "final" else path.name


def build(cfg: AppConfig):
    """(the Gradio app, its model slot, its PNG folder); the model loads in the background."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise AppError(INSTALL_HINT) from None
    from vqgpt.app.backend import VqgptBackend
    from vqgpt.export.hub.app_vqgpt import build_app

    title = f"vqgpt: {model_name(cfg.model)}"
    return build_app(lambda: VqgptBackend.load(cfg.model), title, cfg.concurrency)


def serve(cfg: AppConfig) -> None:
    """Build and serve the app until interrupted."""
    if cfg.concurrency < 1:
        raise ValueError(f"--concurrency {cfg.concurrency}: at least 1")
    demo, _, out_root = build(cfg)
    from vqgpt.export.hub.app_vqgpt import launch

    launch(demo, out_root, cfg.host, cfg.port)
