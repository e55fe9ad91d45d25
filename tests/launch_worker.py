"""The program `accelerate launch` starts as each worker in the tests: `python -u
launch_worker.py -m MODULE ARGS` (or `SCRIPT ARGS`) behaves as `python -u -m MODULE ARGS`. The
tests' served `python` (VQGPT_TESTS_PYTHON, for scripts and what they start) runs it too.

With VQGPT_TESTS_WORKER_SOCKET set (tests/conftest.py sets it for launches it forks), the worker
is forked from the pytest worker's preloaded `cli_server.py --listen` instead of importing torch,
transformers, accelerate and datasets anew (~10 s of a 2-core CPU per worker, two workers per
launch): this program hands over its argv, environment, cwd and standard streams, passes on the
signals it gets, and exits with the worker's status. Without the variable, or if the server is
gone, it execs a real Python. Standard library only, so it starts in ~50 ms.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _real_python(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-u", *argv])


def main(argv: list[str]) -> int:
    path = os.environ.get("VQGPT_TESTS_WORKER_SOCKET")
    while argv[:1] == ["-u"]:  # the server's streams are unbuffered (PYTHONUNBUFFERED=1)
        argv = argv[1:]
    if not path or not argv or (argv[0].startswith("-") and argv[0] != "-m"):
        _real_python(argv)  # not served, or `python -c ...`, `python -I ...`: a real one
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        _real_python(argv)
    request = dict(argv=argv, env=dict(os.environ), cwd=os.getcwd())
    socket.send_fds(conn, [b" "], [0, 1, 2])
    conn.sendall((json.dumps(request) + "\n").encode())
    received: list[int] = []

    def relay(signum: int, _frame) -> None:
        received.append(signum)
        conn.send(bytes([signum]))

    for signum in RELAYED:
        signal.signal(signum, relay)
    reply = b""
    while not reply.endswith(b"\n"):
        try:
            chunk = conn.recv(1 << 16)
        except InterruptedError:
            continue
        if not chunk:  # the worker died without a word: by a signal; so does this program
            signum = received[-1] if received else signal.SIGKILL
            if signum != signal.SIGKILL:
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return 128 + signum
        reply += chunk
    return json.loads(reply)["returncode"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
