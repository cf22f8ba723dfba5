"""Benchmark: a Bento replica's start, BentoML's `bentoml serve` against Flywheel's replica, side by side.

Run `make up` and serve iris first, then `.venv/platform/bin/python bench/replica_start.py [--runs 5]`.
Starts the Bento iris serves now, alternately as `bentoml serve` (BentoML's CLI: a circus arbiter that
loads the service, then spawns the worker that loads it again) and as `flywheel/serving/replica.py`
(BentoML's worker in one process, without the modules the framework never serves with), each pinned
to one core as the platform pins a replica, in a BENTOML_HOME of its own that links the stack's stores.
Prints the seconds from the start to `/readyz` answering 200 and to the first `/predict` answer,
then what each serves once started (wrk, one row a request, 8 connections, pinned to the other
core): medians with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from flywheel.clients import load
from flywheel.core.settings import Settings
from flywheel.platform import deployments

ROW = [5.1, 3.5, 1.4, 0.2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commands(settings: Settings, bento: str, port: int) -> dict[str, list[str]]:
    python = str(settings.venv_ml / "bin" / "python")
    where = ["--host", "127.0.0.1", "--port", str(port)]
    return {
        "bentoml serve": [str(settings.venv_ml / "bin" / "bentoml"), "serve", bento, *where],
        "replica.py": [python, str(settings.repo / "flywheel" / "serving" / "replica.py"), "serve", bento, *where],
    }


def start_once(
    command: list[str], env: dict, log: Path, port: int, core: int, load_seconds: float
) -> tuple[float, float, dict]:
    """Seconds from the spawn to /readyz 200 and to the first /predict answer, then wrk's figures for
    `load_seconds`; the server is stopped after."""
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("wb") as out:
        pinned = ["taskset", "-c", str(core), *command]
        proc = subprocess.Popen(pinned, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{command[:2]} exited {proc.returncode}: {log.read_text()[-2000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
            ready = time.monotonic() - started
            answer = client.post("/predict", json={"inputs": [ROW]})
            answer.raise_for_status()
            answered = time.monotonic() - started
        served = load.run(f"{url}/predict", {"inputs": [ROW]}, 8, load_seconds, cpu=1 - core)
        return ready, answered, served
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="starts per launcher")
    parser.add_argument("--pipeline", default="iris")
    parser.add_argument("--core", type=int, default=1, choices=(0, 1), help="the core each replica is pinned to")
    parser.add_argument("--load-seconds", type=float, default=5, help="wrk's run against each started replica")
    args = parser.parse_args()
    settings = Settings.load()
    live = deployments.current(settings, args.pipeline)
    if live is None:
        raise SystemExit(f"nothing serves {args.pipeline}: upload its data first")
    home = Path(tempfile.mkdtemp(prefix="bench-replica-"))
    for store in ("bentos", "models", "envs"):
        (home / store).symlink_to(settings.bentoml_home / store)
    env = {
        **os.environ,
        **settings.serving_env(),
        "BENTOML_HOME": str(home),
        "FLYWHEEL_REQUEST_LOG": str(home / "requests.log"),
        "FLYWHEEL_INFERENCE_SPOOL": str(home / "spool.jsonl"),
    }
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for i in range(args.runs):
            port = free_port()
            for name, command in commands(settings, live.bento_tag, port).items():
                ready, answered, served = start_once(
                    command, env, home / "serve.log", port, args.core, args.load_seconds
                )
                results.setdefault(name, {"ready": [], "answered": [], "rps": [], "p99_ms": [], "failed": []})
                results[name]["ready"].append(ready)
                results[name]["answered"].append(answered)
                results[name]["rps"].append(served["rps"])
                results[name]["p99_ms"].append(served["p99_us"] / 1000)
                results[name]["failed"].append(served["failed"])
                print(
                    f"run {i + 1} {name}: ready {ready:.2f}s, first answer {answered:.2f}s, "
                    f"{served['rps']:.0f} req/s, p99 {served['p99_us'] / 1000:.1f} ms, {served['failed']} failed",
                    flush=True,
                )
    finally:
        shutil.rmtree(home, ignore_errors=True)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"\n{live.bento_tag}, {args.runs} starts each, pinned to core {args.core}, interleaved")
    print("| launcher | start -> /readyz 200, s | start -> first answer, s | req/s, c=8 | p99 ms | failed |")
    print("|---|---|---|---|---|---|")
    for name, f in results.items():
        print(
            f"| {name} | {cell(f['ready'])} | {cell(f['answered'])} | {cell(f['rps'])} | {cell(f['p99_ms'])} "
            f"| {sum(f['failed'])} |"
        )
    medians = {name: statistics.median(f["ready"]) for name, f in results.items()}
    print(json.dumps({"ready_median_s": medians, "ratio": round(medians["replica.py"] / medians["bentoml serve"], 2)}))


if __name__ == "__main__":
    main()
