"""A real `bentoml serve` for the ML tests: started in its own session, ready or failed loudly, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPLICA = Path(__file__).resolve().parents[2] / "flywheel" / "serving" / "replica.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def launch(bento_tag: str, env: dict, log_path: Path, port: int) -> subprocess.Popen:
    """A replica as the platform starts one (platform/deployments.py): BentoML's serve, its port
    refusing until ready; in its own session, so `stop` ends the server and its workers together."""
    command = [sys.executable, str(REPLICA), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


@contextlib.contextmanager
def serve(bento_tag: str, env: dict, log_path: Path, ready_timeout: float, client_timeout: float = 10):
    """Yield (httpx client, base url) for a served bento; the test fails with the log tail if it never gets ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launch(bento_tag, env, log_path, port)
    try:
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=client_timeout) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                if time.perf_counter() - started > ready_timeout:
                    pytest.fail(f"bentoml serve not ready in {ready_timeout}s:\n{log_path.read_text()[-4000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            print(f"bentoml serve ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
            yield client, url
    finally:
        stop(proc)
