"""Shared test fixtures: the real CLI in subprocesses, tiny recipes and runs, a tiny GPT-2.

Helpers are fixtures (most return a function), so test files never import each other.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from vqgpt.lm.model import round_up
from vqgpt.lm.vocab import VocabLayout
from vqgpt.training import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
# the program each `accelerate launch` of the tests starts as a worker (python -u launch_worker.py
# -m vqgpt.cli ...): forked from a preloaded server, not a new Python (tests/launch_worker.py)
LAUNCH_WORKER = Path(__file__).with_name("launch_worker.py")

# Under pytest-xdist (`-n 2`, the README's command) each worker is one of N processes sharing the
# cores: torch's default (one thread per core) in every worker oversubscribes them, and its
# threads spin-wait on each other (decoding tests of a tiny GPT-2 ran 30x slower in the suite than
# alone). One thread per worker, as every CLI subprocess of the tests already has.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


def _tiny_tokenizer_recipe(out_dir: Path, **sections) -> dict:
    """A recipe that trains in seconds on 2 cores (32 px shapes, 8x8 tokens, K=32)."""
    recipe = {
        "model": dict(
            image_size=32, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4
        ),
        "quantizer": dict(codebook_size=32, restart_after_steps=2),
        "data": dict(
            source="shapes", shapes=dict(num_images=64, num_test_images=16, image_size=32)
        ),
        "train": dict(
            output_dir=str(out_dir),
            batch_size=8,
            max_steps=6,
            warmup_steps=2,
            log_every=1,
            eval_every=0,
            save_every=2,
            keep_checkpoints=5,
            num_threads=1,
        ),
        "eval": dict(max_images=16, batch_size=16, grid_images=4),
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    env["TQDM_DISABLE"] = "1"
    return env


def _run_cli(
    *args: str,
    launcher: list[str] | None = None,
    check: bool = True,
    timeout: int = 300,
    cwd: Path | None = None,
):
    """Run `python -m vqgpt.cli ARGS` (or through an accelerate launcher) and return the result.

    On a timeout every process of the run prints its stacks (SIGUSR1: `vqgpt.cli` registers
    faulthandler for it) before it is killed, and the failure shows them.
    """
    if launcher is not None and launcher[-1] != str(LAUNCH_WORKER):
        launcher = [*launcher, str(LAUNCH_WORKER)]
    cmd = (launcher or [sys.executable]) + ["-m", "vqgpt.cli", *args]
    return _run(cmd, check=check, timeout=timeout, cwd=cwd)


class _CliServer:
    """The client of tests/cli_server.py: `python -m vqgpt.cli ARGS` forked from a process that
    has imported torch & co. once (the same process, without ~5-10 s of imports in each). One per
    pytest worker, started on first use; a call whose environment differs from the one it started
    with (other than pytest's own variables) runs in a new Python instead. A launch's workers fork
    from it too, through tests/launch_worker.py (any number at once)."""

    MODULES = ("vqgpt.cli", "accelerate.commands.launch")
    _instance: _CliServer | None = None
    _env: dict[str, str] | None = None

    @staticmethod
    def _key(env: dict[str, str]) -> dict[str, str]:
        # pytest's own, and torch inductor's private ones (it sets _TORCHINDUCTOR_PYOBJECT_TENSOR_
        # DATA_PTR in the test process when a test compiles: the skips named it)
        return {k: v for k, v in env.items() if not k.startswith(("PYTEST_", "_TORCHINDUCTOR_"))}

    @classmethod
    def why_not(cls, env: dict[str, str]) -> str | None:
        """Why a call with `env` is not served (None: it is), naming the variables that differ."""
        if os.environ.get("VQGPT_TESTS_NO_CLI_SERVER") == "1":
            return "VQGPT_TESTS_NO_CLI_SERVER=1"
        if sys.platform != "linux":  # macOS: forking after torch's import is not safe there
            return f"{sys.platform}: no forking after torch's import"
        if cls._env is None:
            return None
        key = cls._key(env)
        changed = sorted(k for k in key.keys() | cls._env.keys() if key.get(k) != cls._env.get(k))
        if changed:
            return "the environment differs from the one this worker's server started with: " + (
                ", ".join(changed)
            )
        return None

    @classmethod
    def serves(cls, env: dict[str, str]) -> bool:
        return cls.why_not(env) is None

    @classmethod
    def get(cls) -> _CliServer:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            env = _cli_env()
            cls._env = cls._key(env)
            cls._instance = cls(env)
        return cls._instance

    def __init__(self, env: dict[str, str]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vqgpt-cli-server-"))
        self.socket = str(self.folder / "workers.sock")  # launched workers connect here
        server = Path(__file__).with_name("cli_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(server), "--listen", self.socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            start_new_session=True,
        )
        self.python = self.folder / "python"  # `python ARGS` served: launch_worker.py ARGS
        self.python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{LAUNCH_WORKER}" "$@"\n')
        self.python.chmod(0o755)
        self.ready = False
        self.calls = 0
        self.pending = b""  # read from the server, not yet a whole line
        atexit.register(self.close)

    def worker_socket(self) -> str:
        """The socket that serves launched workers (tests/launch_worker.py), ready on return."""
        if not self.ready:
            assert self._reply(120) == {"ready": True}, "the CLI fork server did not start"
            self.ready = True
        return self.socket

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # EOF: the server ends
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _reply(self, timeout: float | None) -> dict | None:
        """The server's next line, or None if none came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError("the CLI fork server (tests/cli_server.py) died")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def start(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> _Started:
        """Fork `cmd` (`python -m MODULE ...`) with `env`; its pid (a session leader) at once.
        One at a time: `finish` it before the next."""
        self.calls += 1
        out, err = self.folder / f"{self.calls}.out", self.folder / f"{self.calls}.err"
        socket_path = self.worker_socket()
        if cmd[2] == "accelerate.commands.launch":  # its workers fork from this server too
            env = dict(env, VQGPT_TESTS_WORKER_SOCKET=socket_path)
        request = dict(module=cmd[2], argv=cmd[3:], env=env, cwd=str(cwd) if cwd else None,
                       stdout=str(out), stderr=str(err))  # fmt: skip
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return _Started(cmd, self._reply(60)["pid"], out, err)

    def finish(
        self, started: _Started, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Wait for `started` to end (on a timeout: stacks, then a kill, then raise)."""
        reply = self._reply(timeout)
        timed_out = reply is None
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGUSR1)  # every thread dumps its stack to stderr
            time.sleep(3)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGKILL)
            reply = self._reply(None)
        stdout, stderr = (p.read_text(errors="replace") for p in (started.out, started.err))
        started.out.unlink()
        started.err.unlink()
        if timed_out:
            raise _timed_out(started.cmd, timeout, stdout, stderr)
        return _completed(started.cmd, reply["returncode"], stdout, stderr, check)

    def run(self, cmd: list[str], env: dict[str, str], check: bool, timeout: int, cwd: Path | None):
        """`cmd` (`python -m MODULE ...`) as a forked child with `env`: as `_run` returns."""
        return self.finish(self.start(cmd, env, cwd), check=check, timeout=timeout)


class _Started(NamedTuple):
    """A command the CLI server forked: its pid and the files of its stdout and stderr."""

    cmd: list[str]
    pid: int
    out: Path
    err: Path


def _timed_out(cmd: list[str], timeout: float, out: str, err: str) -> AssertionError:
    return AssertionError(
        f"{' '.join(cmd)} timed out after {timeout} s; stacks and output:\n{out[-3000:]}\n"
        f"{err[-20000:]}"
    )


def _completed(
    cmd: list[str], returncode: int, out: str, err: str, check: bool
) -> subprocess.CompletedProcess:
    """The result; with `check`, a failure raises with the ends of both streams."""
    result = subprocess.CompletedProcess(cmd, returncode, out, err)
    if check and returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({returncode})\n{out[-3000:]}\n{err[-5000:]}")
    return result


def _run(
    cmd: list[str], check: bool = True, timeout: int = 300, cwd: Path | None = None, env=None
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd)` in a new process group; on a timeout, stacks, then a kill.
    `python -m vqgpt.cli ...` and `python -m accelerate.commands.launch ...` in the tests'
    environment fork from the worker's CLI server (`_CliServer`): the same process, ~3-5 s
    sooner (a launch's workers are new Pythons either way)."""
    if env is None and cmd[:2] == [sys.executable, "-m"] and cmd[2] in _CliServer.MODULES:
        env = _cli_env()
        if _CliServer.serves(env):
            return _CliServer.get().run(cmd, env, check=check, timeout=timeout, cwd=cwd)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _cli_env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)  # every rank dumps its stacks to stderr
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise _timed_out(cmd, timeout, out, err) from None
    return _completed(cmd, proc.returncode, out, err, check)


def _free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous of a 2-process run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate_launcher() -> list[str]:
    """`accelerate launch` with two CPU processes over gloo, on a free port; its last item is the
    workers' program (LAUNCH_WORKER), so `-m MODULE ARGS` or `SCRIPT ARGS` follows."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(LAUNCH_WORKER),  # then `-m vqgpt.cli ...` or `SCRIPT ...`, as after `python -u`
    ]


@pytest.fixture()
def accelerate_launcher() -> list[str]:
    """`accelerate launch` with two CPU processes over gloo."""
    return _accelerate_launcher()


def _python_forked() -> tuple[list[str], dict[str, str]]:
    """(command prefix, env): `[*prefix, "-m", MODULE, ...]` or `[*prefix, SCRIPT, ...]` runs as
    `python -u ...` would, forked from the preloaded CLI server when it serves (several at once,
    unlike `run_cli`; what it starts with `sys.executable` is forked too); else a new Python."""
    env = _cli_env()
    why_not = _CliServer.why_not(env)
    if why_not is not None:
        env["VQGPT_TESTS_NOT_SERVED"] = why_not  # for a test that needs the server to say why
        return [sys.executable], env
    server = _CliServer.get()
    env["VQGPT_TESTS_WORKER_SOCKET"] = server.worker_socket()
    env["VQGPT_TESTS_PYTHON"] = str(server.python)
    return [str(server.python)], env


@pytest.fixture(scope="session")
def launch_worker() -> Path:
    """The program to give `accelerate launch` as its script, before `-m MODULE` or `SCRIPT`."""
    return LAUNCH_WORKER


@pytest.fixture(scope="session")
def python_forked():
    """() -> (command prefix, env) of a `python -u` forked from a preloaded server, for
    processes that must run side by side (two launchers of a two-machine run)."""
    return _python_forked


@pytest.fixture(scope="session")
def new_accelerate_launcher():
    """() -> a fresh `accelerate_launcher` (for module- and session-scoped fixtures)."""
    return _accelerate_launcher


def _tiny_lm_recipe(tokenizer_run: Path, out_dir: Path, codes_dir: Path, **sections) -> dict:
    """A stage-two recipe over a tiny tokenizer: 2-layer GPT-2, 8x8 codes, seconds per run."""
    recipe = {
        "data": dict(
            tokenizer=str(tokenizer_run),
            output_dir=str(codes_dir),
            batch_size=32,
            images=dict(
                source="shapes", shapes=dict(num_images=64, num_test_images=16, image_size=32)
            ),
        ),
        "sequences": dict(max_length=160, caption_dropout=0.2),
        "model": dict(preset="tiny"),
        "train": dict(
            output_dir=str(out_dir),
            batch_size=4,
            max_steps=6,
            warmup_steps=2,
            log_every=1,
            eval_every=0,
            save_every=2,
            keep_checkpoints=5,
            num_threads=1,
        ),
        "eval": dict(max_images=8, batch_size=8, baseline_images=32),
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


@pytest.fixture(scope="session")
def tiny_tokenizer_run(tmp_path_factory) -> Path:
    """A stage-one tokenizer trained in seconds with the real CLI (shared by the stage-two tests)."""
    out = tmp_path_factory.mktemp("tokenizer") / "run"
    cfg = _write_yaml(out.parent / "r.yaml", _tiny_tokenizer_recipe(out, train=dict(save_every=0)))
    _run_cli("train-tokenizer", "--config", str(cfg))
    return out


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int = 2) -> int:
    """Start `python -m vqgpt.cli CMD`, SIGKILL it once checkpoint `step` exists (a hard kill,
    possibly in the middle of a later save); the newest step left. Returns once it is dead."""
    cmd, env = [sys.executable, "-m", "vqgpt.cli", *cmd], _cli_env()
    deadline = time.time() + 240

    def wait_for_checkpoint(running, stderr) -> None:
        while not (out / "checkpoints" / f"step_{step}").is_dir():
            assert running(), f"the run ended before its checkpoint:\n{stderr()[-3000:]}"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)

    if _CliServer.serves(env):  # forked: a session leader, its end reported once it is reaped
        server = _CliServer.get()
        started = server.start(cmd, env)

        def running() -> bool:
            try:
                os.kill(started.pid, 0)  # the server reaps it within ~20 ms of its end
            except ProcessLookupError:
                return False
            return True

        wait_for_checkpoint(running, lambda: started.err.read_text(errors="replace"))
        os.killpg(started.pid, signal.SIGKILL)
        assert server.finish(started, check=False).returncode == -signal.SIGKILL
    else:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_checkpoint(lambda: proc.poll() is None, lambda: proc.stderr.read().decode())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return int(list_checkpoints(out)[-1].name.split("_")[1])


# ---------------------------------------------------------------------------------------------
# the helpers as fixtures


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (configs/, scripts/)."""
    return ROOT


@pytest.fixture(scope="session")
def load_script():
    """(name) -> scripts/<name>.py as a module, registered in sys.modules under `name` (so its
    dataclasses resolve)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def cli_env():
    """() -> the environment of a CLI subprocess: offline, one thread, no progress bars."""
    return _cli_env


@pytest.fixture(scope="session")
def run_cli():
    """(*args, launcher=None, check=True, timeout=300, cwd=None) -> CompletedProcess of the CLI,
    in its own process (or through `launcher`, a real `accelerate launch`), forked from the
    worker's CLI server (tests/cli_server.py; a launch's workers are new Pythons)."""
    return _run_cli


def _cli_in_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`vqgpt.cli.main(ARGS)` in this process, stdout and stderr captured: the exit status and the
    output of the CLI without the ~5 s start of a new Python. For error paths tested many times
    over (damaged folders, bad files); an exception the CLI lets through fails the test with its
    traceback, as a subprocess would print it. Library log handlers made before the call keep the
    real stderr, so each kind keeps some cases in a real process (`run_cli`)."""
    from transformers.utils import logging as hf_logging

    from vqgpt import cli

    out, err = io.StringIO(), io.StringIO()
    formatwarning = warnings.formatwarning  # the CLI reformats warnings for its one process
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # as TQDM_DISABLE=1 does in `run_cli`'s processes
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else 2
    finally:
        warnings.formatwarning = formatwarning
        if bars:
            hf_logging.enable_progress_bar()
    result = subprocess.CompletedProcess(["vqgpt", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"vqgpt {' '.join(args)} failed ({code})\n{result.stderr[-5000:]}")
    return result


def _error_line(result: subprocess.CompletedProcess, command: str | None = None) -> str:
    """The one stderr line of a failed CLI call: exit 2, no traceback, one line (starting
    `vqgpt COMMAND: error:` when `command` is given)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    if command is not None:
        assert lines[0].startswith(f"vqgpt {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def error_line():
    """(result, command=None) -> the one stderr line of a failed CLI call (exit 2, no traceback)."""
    return _error_line


@pytest.fixture
def cli_in_process():
    """(*args, check=True) -> CompletedProcess of `vqgpt.cli.main` run in this process."""
    return _cli_in_process


@pytest.fixture(scope="session")
def write_yaml():
    """(path, data) -> path, the data written as YAML."""
    return _write_yaml


@pytest.fixture(scope="session")
def tiny_tokenizer_recipe():
    """(out_dir, **sections) -> a stage-one recipe that trains in seconds."""
    return _tiny_tokenizer_recipe


@pytest.fixture(scope="session")
def tiny_lm_recipe():
    """(tokenizer_run, out_dir, codes_dir, **sections) -> a stage-two recipe of seconds."""
    return _tiny_lm_recipe


@pytest.fixture(scope="session")
def kill_after_checkpoint():
    """(cmd, out, step=2) -> SIGKILL a CLI run once checkpoint `step` exists; its newest step."""
    return _kill_after_checkpoint


def _tiny_gpt2(layout: VocabLayout, seed: int = 0, n_positions: int = 40) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=round_up(layout.vocab_size, 64),
        n_positions=n_positions,
        bos_token_id=layout.eos_id,
        eos_token_id=layout.eos_id,
        initializer_range=0.2,  # peaky logits: argmax margins far above float noise
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_gpt2():
    """(layout, seed=0, n_positions=40) -> a 2-layer GPT-2 over `layout`, in eval mode."""
    return _tiny_gpt2


# Runs first in a child of run_without_vqgpt: `import vqgpt` fails, vqgpt's source is off sys.path.
_NO_VQGPT_GUARD = """
import importlib.abc, sys
class _NoVqgpt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vqgpt" or name.startswith("vqgpt."):
            raise ModuleNotFoundError(f"vqgpt must not be imported here ({name})")
        return None
sys.meta_path.insert(0, _NoVqgpt())
sys.path[:] = [p for p in sys.path if "vqgpt" not in p and not p.endswith("/src")]
try:
    import vqgpt  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the guard failed: vqgpt is importable")
"""


class Command(NamedTuple):
    """A command line with its environment and working folder."""

    cmd: list[str]
    env: dict[str, str]
    cwd: Path


def _without_vqgpt(code: str, tmp: Path, *args: str) -> Command:
    """`python -I -c code args` in a bare folder under `tmp`, vqgpt blocked, offline."""
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    env = _cli_env()
    env.pop("PYTHONPATH", None)
    env["HF_MODULES_CACHE"] = str(tmp / "hf_modules")  # remote code is copied here
    return Command([sys.executable, "-I", "-c", _NO_VQGPT_GUARD + code, *args], env, cwd)


@pytest.fixture(scope="session")
def without_vqgpt():
    """(code, tmp, *args) -> the Command of `python -I` in a bare folder with vqgpt blocked (for
    a long-running process: a server)."""
    return _without_vqgpt


@pytest.fixture(scope="session")
def run_without_vqgpt():
    """(code, tmp, *args) -> `python -I` in a bare folder with vqgpt blocked; fails the test on
    a non-zero exit."""

    def run(code: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
        cmd, env, cwd = _without_vqgpt(code, tmp, *args)
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-5000:]
        return result

    return run


# ---------------------------------------------------------------------------------------------
# a tiny trained pipeline and its export (the export tests and the web app's)

EXPORT_PREFIX = 24  # sequences.t2i_prefix_length of `lm_run`: captions of 48 tokens do not fit


@pytest.fixture(scope="session")
def lm_run(tiny_tokenizer_run, tmp_path_factory) -> Path:
    """An LM run of two steps (t2i prefix EXPORT_PREFIX) over the tiny tokenizer."""
    root = tmp_path_factory.mktemp("export_lm")
    out = root / "run"
    recipe = _tiny_lm_recipe(
        tiny_tokenizer_run,
        out,
        root / "codes",
        train=dict(max_steps=2, save_every=0),
        sequences=dict(t2i_prefix_length=EXPORT_PREFIX),  # the processor must pad the same
    )
    _run_cli("train-lm", "--config", str(_write_yaml(root / "r.yaml", recipe)))
    return out


@pytest.fixture(scope="session")
def exported(lm_run, tmp_path_factory) -> Path:
    """`lm_run` exported (no --metrics, no push)."""
    from vqgpt.export.folder import ExportConfig, export_run

    out = tmp_path_factory.mktemp("export_out") / "vqgpt-tiny"
    result = export_run(ExportConfig(str(lm_run), str(out)))
    assert result.folder == out and result.has_lm and result.url is None
    return out


@pytest.fixture(scope="session")
def run_command():
    """(cmd, check=True, timeout=300, cwd=None, env=None) -> CompletedProcess; on a timeout every
    process prints its stacks before it is killed."""
    return _run


@pytest.fixture(scope="session")
def free_port():
    """() -> a TCP port nobody listens on now (a rendezvous for processes launched together)."""
    return _free_port
