"""A fork server for the tests' CLI processes: `python -m vqgpt.cli ARGS` (and `python -m
accelerate.commands.launch ...`, and the workers a launch starts) without the ~5-10 s import of
torch, transformers, accelerate and datasets in every one.

The tests run the real CLI in a new process (its exit status, its stdout and stderr, its signals),
over a hundred times. Started once per pytest worker, this process imports those libraries (and
nothing of vqgpt), runs no torch op and starts no thread (so no thread pool exists to break in a
fork), then for each request forks a child that is such a process: new session, its own cwd,
environment, stdin (/dev/null), stdout and stderr (files), fresh `random` / NumPy seeds, the module
run as `__main__` as `python -m` runs it, its exit handlers run at the end. The server reports the
child's pid at once (a timeout signals its process group) and its exit status when it ends.

Protocol, one JSON object per line: {"ready": true} on stdout once the libraries are loaded; then
request {"module", "argv", "env", "cwd", "stdout", "stderr"} on stdin, then {"pid": N} and
{"returncode": N} (negative: killed by that signal) on stdout, one request at a time. EOF ends it.

Launched workers: `cli_server.py --listen SOCKET` also serves the workers of `accelerate launch`.
The tests give the launcher `tests/launch_worker.py` (a stdlib-only Python, ~50 ms to start) as
each worker's program; it connects to SOCKET and hands over its argv (`-m MODULE ...` or `SCRIPT
...`), environment (the launcher's RANK, WORLD_SIZE, MASTER_PORT...), cwd and its stdin / stdout /
stderr (SCM_RIGHTS); the server forks a child that runs the module or script as `python -u` would
and writes its exit status back (also from `os._exit`, how a launched CLI ends). The connection
stays open: a signal the launcher sends the worker program is passed on to the child (one byte, the
signal number), and the child kills itself when the connection closes (the program was killed).
Any number of workers run at once, beside the one request of stdin. The tests also hand scripts a
`python` that is this program (VQGPT_TESTS_PYTHON: `python ARGS` -> `launch_worker.py ARGS`), and
it is `sys.executable` in what it forks: a benchmark's own subprocesses fork too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import runpy
import select
import signal
import socket
import sys
import threading
import traceback


def preload() -> None:
    """The libraries every vqgpt command imports (not vqgpt: each child imports it fresh)."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import yaml  # noqa: F401


def _new_process(env: dict[str, str], cwd: str | None) -> None:
    """In a forked child: the environment, cwd and seeds of a new process; PYTHONPATH entries the
    server did not start with go on sys.path where a new Python puts them (after the script's
    folder), and `sys.executable` is the tests' served `python` when they name one."""
    if cwd:
        os.chdir(cwd)
    started_with = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    added = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in started_with]
    sys.path[1:1] = [os.path.abspath(p) for p in added]
    os.environ.clear()
    os.environ.update(env)
    sys.executable = env.get("VQGPT_TESTS_PYTHON", sys.executable)
    random.seed()  # a new process draws new seeds; a fork copies the server's
    import numpy

    numpy.random.seed()


def _run_main(argv: list[str]) -> int:
    """Run `argv` (`-m MODULE ARGS` or `SCRIPT ARGS`) as `python argv` would in this process;
    its exit status (an uncaught exception: its traceback on stderr, 1)."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` does
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as stop:
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code or 0
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        return 1


def _end(code: int) -> None:
    """Exit as the interpreter would: exit handlers, flushed streams."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def child(request: dict) -> None:
    """In the forked child: become `python -m MODULE ARGV` (MODULE: vqgpt.cli or accelerate's
    launcher); never returns."""
    code = 1
    try:
        os.setsid()
        _new_process(request["env"], request.get("cwd"))
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        code = _run_main(["-m", request["module"], *request["argv"]])
        _end(code)
    finally:
        os._exit(code)


def _relay_signals(conn: socket.socket) -> None:
    """In a served worker (a thread): raise each signal number the worker program sends; when the
    worker program is gone (EOF), die with it."""
    while True:
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            os.kill(os.getpid(), signal.SIGKILL)
        for signum in data:
            os.kill(os.getpid(), signum)


def worker(conn: socket.socket) -> None:
    """In the forked child: become the launched worker `python -u ARGV` that connected on `conn`;
    never returns."""
    code = 1
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 16)
            if not more:
                raise EOFError("the worker program closed the connection mid-request")
            data += more
        request = json.loads(data)
        for fd, target in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        _new_process(request["env"], request["cwd"])
        threading.Thread(target=_relay_signals, args=(conn,), daemon=True).start()
        real_exit = os._exit

        def report_then_exit(status: int) -> None:
            # a launched CLI ends with os._exit (vqgpt.distributed.leave_process_group)
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps({"returncode": status}) + "\n").encode())
            real_exit(status)

        os._exit = report_then_exit
        code = _run_main(request["argv"])
        _end(code)
    except BaseException:  # noqa: BLE001 - a broken request: say why on whatever stderr we have
        traceback.print_exc()
    finally:
        os._exit(code)


def serve(listen: str | None) -> None:
    """Requests from stdin (one at a time) and, with `listen`, workers from that Unix socket (any
    number at once), until EOF on stdin."""
    preload()
    server = None
    if listen:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(listen)
        server.listen(64)

    def say(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    stdin, pending, running = sys.stdin.fileno(), b"", None  # running: the request's child
    while True:
        waits = [stdin] + ([server] if server else [])
        ready, _, _ = select.select(waits, [], [], 0.02)
        while True:  # reap every child that ended: the request's is reported, workers' are not
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == running:
                say({"returncode": os.waitstatus_to_exitcode(status)})
                running = None
        if server in ready:
            conn, _ = server.accept()
            if os.fork() == 0:
                server.close()
                worker(conn)
            conn.close()
        if stdin in ready:
            chunk = os.read(stdin, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                running = os.fork()
                if running == 0:
                    child(request)
                say({"pid": running})


if __name__ == "__main__":
    serve(sys.argv[2] if sys.argv[1:2] == ["--listen"] else None)
