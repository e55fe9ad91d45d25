"""The tests' fork server (tests/cli_server.py) as launched workers see it: tests/launch_worker.py
behaves as `python -u` (argv, cwd, environment, streams, exit status, signals), served or not."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

SCRIPT = """
import os, sys, time
print(sys.argv[1:], os.getcwd(), os.environ["WORKER_TEST"], sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "wait":
    open("pid", "w").write(str(os.getpid()))
    time.sleep(60)
if sys.argv[1] == "hard":
    os._exit(5)
sys.exit(3)
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("served", [True, False])
def test_the_worker_program_runs_a_script_as_python_does(served, script, tmp_path, python_forked):
    python, env = python_forked()
    if served and "VQGPT_TESTS_WORKER_SOCKET" not in env:
        pytest.skip(f"no fork server here: {env.get('VQGPT_TESTS_NOT_SERVED')}")
    if not served:
        env.pop("VQGPT_TESTS_WORKER_SOCKET", None)
    env["WORKER_TEST"] = "x1"
    for how, code in (("exit", 3), ("hard", 5)):
        result = subprocess.run([*python, str(script), how, "b c"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == code
        assert result.stdout == f"{[how, 'b c']} {tmp_path} x1 True\n"
        assert result.stderr == "to stderr\n"
    module = subprocess.run([*python, "-m", "json.tool", "--compact"], input='{"a": [1, 2]}',
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (module.returncode, module.stdout) == (0, '{"a":[1,2]}\n')


def _wait_for(predicate, what: str) -> None:
    deadline = time.time() + 30
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_worker_program_reaches_the_worker(signum, script, tmp_path, python_forked):
    """SIGTERM is passed on (both end by it); SIGKILL ends the program, and the worker with it."""
    python, env = python_forked()
    if "VQGPT_TESTS_WORKER_SOCKET" not in env:
        pytest.skip(f"no fork server here: {env.get('VQGPT_TESTS_NOT_SERVED')}")
    env["WORKER_TEST"] = "x"
    proc = subprocess.Popen([*python, str(script), "wait"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pid_file = tmp_path / "pid"
    _wait_for(lambda: pid_file.is_file() and pid_file.read_text(), "the worker never started")
    worker = int(pid_file.read_text())
    assert worker != proc.pid  # forked from the server, not this program
    proc.send_signal(signum)
    assert proc.wait(30) == -signum
    _wait_for(lambda: not _alive(worker), "the worker outlived its program")
