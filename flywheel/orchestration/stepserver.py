"""The step server: a warm process of the ML environment that forks one child per step.

A cold step (`python -m flywheel.training.train`) spends most of its life importing MLflow,
XGBoost, scikit-learn and pandas (3-7 s on 2 cores), and a run has several steps. This server
imports them once; each step is a child it forks, so a step still runs in a process of its own,
with the environment, working directory and nice level its task sent, and nothing else of the
server's (no secret: the server holds none). The protocol, over a Unix socket only its owner
can reach:

1. the runner connects and sends one JSON request (argv after `python`, env, cwd, nice) with the
   write end of a pipe, as SCM_RIGHTS: the step's stdout and stderr, which the runner streams
   into its task log as it does a subprocess's;
2. the server forks at once; the child says `{"pid": N}`, runs the module as `__main__`, and says
   `{"exit": code}` before it exits (one JSON object a line);
3. a runner that goes away (its task killed) closes the socket: the child, watching it, kills its
   own process group, so no step outlives its task. A server that goes away (kill -9) orphans its
   running steps, which the reaper kills (platform/reaper.py) and their tasks retry; supervisord
   starts it again, and until it listens the runner runs steps cold (runner.run_local).

TensorFlow is not preloaded: it starts threads at import, and a fork of a threaded process is not
safe. Only single-threaded imports are, so the server refuses to start if a preload left a thread.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

# What the steps import that costs seconds; all single-threaded at import.
PRELOAD = ("pandas", "pyarrow.parquet", "sklearn.model_selection", "sklearn.metrics", "xgboost", "mlflow")
MAX_REQUEST = 1 << 20  # a request is argv + env: far less than this


def _recv_request(conn: socket.socket) -> tuple[dict | None, list[int]]:
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 4)
    return (json.loads(message) if message else None), fds


def _watch(conn: socket.socket) -> None:
    """In the child: the runner hanging up (its task killed) ends the step and whatever it started."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.killpg(os.getpid(), signal.SIGKILL)


def _child(conn: socket.socket) -> None:
    """Run one step in this forked process, and never return."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; a step's subprocesses must not
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own process group: killed whole when its runner goes
        request, fds = _recv_request(conn)
        if request is None:  # a health check: connected, and hung up
            os._exit(0)
        for fd in fds[:1]:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        for fd in fds:
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.environ.clear()
        os.environ.update(request["env"])
        try:
            os.chdir(request.get("cwd") or "/")
        except OSError:  # the task's folder is not here (compose: the server is a container of its own)
            os.chdir("/")
        if request.get("nice"):
            os.nice(int(request["nice"]))
        threading.Thread(target=_watch, args=(conn,), daemon=True).start()
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        argv = list(request["argv"])
        if argv[:1] != ["-m"] or len(argv) < 2:
            raise ValueError(f"a step is `-m <module> ...`, not {argv[:2]}")
        sys.argv = [argv[1], *argv[2:]]
        try:
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # whatever happened, the runner hears an exit status
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except Exception:  # the runner is gone: nobody to tell
            pass
        os._exit(code)


def serve(path: Path, preload: Iterable[str] = PRELOAD) -> None:
    started = time.monotonic()
    preload = tuple(preload)
    for module in preload:
        importlib.import_module(module)
    if threading.active_count() > 1:
        names = [t.name for t in threading.enumerate()]
        raise SystemExit(f"a preload started threads ({names}): forking this process is not safe")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is its owner's alone (0600)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(
        f"step server: {len(preload)} modules preloaded in {time.monotonic() - started:.1f}s; listening on {path}",
        flush=True,
    )
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _child(conn)
        conn.close()


def check(path: Path) -> None:
    """A health check: the server accepts a connection (and forgets it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the warm step server of the ML environment")
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on")
    parser.add_argument("--preload", default=",".join(PRELOAD), help="modules to import once, comma-separated")
    parser.add_argument("--check", action="store_true", help="only check that a server listens there")
    options = parser.parse_args(argv)
    if options.check:
        check(options.socket)
    else:
        serve(options.socket, [m for m in options.preload.split(",") if m])


if __name__ == "__main__":
    main()
