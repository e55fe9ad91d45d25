#!/usr/bin/env bash
# Create .venv with the pinned CPU torch, then vqgpt and its dev extras (editable): the test tools,
# gradio and playwright (the browser tests use Debian's chromium, never `playwright install`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A bare `torch` requirement would pull a multi-GB CUDA build: install the pinned CPU wheel first.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4,<2.15"
python -m pip install -q -e ".[dev]"
