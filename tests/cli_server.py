"""A fork server for the tests' CLI processes: `python -m vqgpt.cli ARGS` (and `python -m
accelerate.commands.launch ...`, the launcher only) without the ~3-5 s import of torch,
transformers, accelerate and datasets in every one.

The tests run the real CLI in a new process (its exit status, its stdout and stderr, its signals),
over a hundred times. Started once per pytest worker, this process imports those libraries (and
nothing of vqgpt), runs no torch op (so no thread pool exists to break in a fork), then for each
request forks a child that is such a process: new session, its own cwd, environment, stdin
(/dev/null), stdout and stderr (files), fresh `random` / NumPy seeds, the module run as
`__main__` as `python -m` runs it, its exit handlers run at the end. The server reports the
child's pid at once (a timeout signals its process group) and its exit status when it ends.

Protocol, one JSON object per line: request {"module", "argv", "env", "cwd", "stdout", "stderr"}
on stdin, then {"pid": N} and {"returncode": N} (negative: killed by that signal) on stdout. EOF
ends it.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import runpy
import sys
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


def child(request: dict) -> None:
    """In the forked child: become `python -m MODULE ARGV` (MODULE: vqgpt.cli or accelerate's
    launcher, whose workers are new Pythons); never returns."""
    code = 1
    try:
        os.setsid()
        if request.get("cwd"):
            os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        random.seed()  # a new process draws new seeds; a fork copies the server's
        import numpy

        numpy.random.seed()
        module = request["module"]
        sys.argv = [module, *request["argv"]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    preload()
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
