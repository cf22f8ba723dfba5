"""Benchmark: what live rollouts cost serving, side by side in one run.

1. The inference spool (every answer's request id, inputs, prediction and version, appended to a file
   once a second for feedback to join): two replicas of the live iris bento on spare ports, one with
   FLYWHEEL_INFERENCE_SPOOL and one without, each pinned to CPU 0 in turn, wrk on CPU 1; c=32.
2. Nginx mirroring (a shadow rollout): the stack's Nginx in front of the live replicas, plain, and with
   every request mirrored to a third replica as a shadow candidate would be; c=32, measured with
   bench/client.py (see run_client for why not wrk).

Rounds are interleaved (off, on, off, on, ...) and each figure is the median of the rounds, with its
range. Needs the stack up with the pipeline deployed and no rollout running. `--pipeline digits` (or
mnist) measures the spool of an image pipeline: one image per request, its three-number summary
(core/profiles.py) computed and spooled only when the spool is on; mirroring is measured for iris.
Run: .venv/platform/bin/python bench/live_overhead.py [--pipeline iris] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flywheel.clients import load as loadgen
from flywheel.core.settings import Settings
from flywheel.platform import deployments, routes, stack
from flywheel.platform.deployments import Deployment, Traffic

BENCH = Path(__file__).resolve().parent
BODIES = {
    "iris": {"inputs": [[5.1, 3.5, 1.4, 0.2]]},
    # One digit-like image each: a bar of ink on a blank field.
    "digits": {"inputs": [[[0.0] * 2 + [12.0] * 4 + [0.0] * 2 for _ in range(8)]]},
    "mnist": {"inputs": [[[0.0] * 10 + [200.0] * 8 + [0.0] * 10 for _ in range(28)]]},
}
BODY = BODIES["iris"]
SERVER_CPU, LOAD_CPU = 0, 1
CONNECTIONS = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(settings: Settings, tag: str, port: int, env: dict[str, str], cpu: int | None) -> subprocess.Popen:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    command = [str(settings.venv_ml / "bin" / "bentoml"), "serve", tag, "--host", settings.host, "--port", str(port)]
    server = subprocess.Popen(
        [*pin, *command],
        env={**os.environ, **settings.serving_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.wait_healthy(f"{settings.url(port)}/readyz", 120)
    return server


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


def run(url: str, seconds: float, cpu: int | None = LOAD_CPU) -> dict:
    wrk = loadgen.run(url, BODY, CONNECTIONS, seconds, cpu=cpu)
    return {"rps": wrk["rps"], "p99_ms": wrk["p99_us"] / 1000, "failed": wrk["failed"]}


def run_client(url: str, seconds: float) -> dict:
    """bench/client.py: it honours `Connection: close` as HTTP clients do. wrk does not wait for the
    close, and a mirrored request's connection closes only once its shadow copy is answered: wrk
    counts the reset of its next request on that connection as a read error."""
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "client.py"),
            url,
            json.dumps(BODY),
            "--connections",
            str(CONNECTIONS),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    return {"rps": result["rps"], "p99_ms": result["p99_ms"], "failed": result["failed"]}


def summary(name: str, runs: list[dict]) -> dict:
    rps = [r["rps"] for r in runs]
    p99 = [r["p99_ms"] for r in runs]
    return {
        "variant": name,
        "rps": statistics.median(rps),
        "rps_range": [min(rps), max(rps)],
        "p99_ms": statistics.median(p99),
        "p99_range": [min(p99), max(p99)],
        "failed": sum(r["failed"] for r in runs),
        "runs": runs,
    }


def spool(settings: Settings, tag: str, seconds: float, rounds: int) -> list[dict]:
    ports = [free_port(), free_port()]
    with tempfile.TemporaryDirectory() as tmp:
        envs = {"spool off": {}, "spool on": {"FLYWHEEL_INFERENCE_SPOOL": str(Path(tmp) / "bench.jsonl")}}
        results: dict[str, list[dict]] = {name: [] for name in envs}
        for _ in range(rounds):
            for (name, env), port in zip(envs.items(), ports, strict=True):
                server = serve(settings, tag, port, env, SERVER_CPU)
                try:
                    url = f"{settings.url(port)}/predict"
                    loadgen.run(url, BODY, 1, 2, cpu=LOAD_CPU)  # warm
                    results[name].append(run(url, seconds))
                finally:
                    stop(server)
        spooled = sum(1 for _ in (Path(tmp) / "bench.jsonl").open()) if (Path(tmp) / "bench.jsonl").exists() else 0
    print(f"spool: {spooled} answers spooled in the 'on' rounds")
    return [summary(name, runs) for name, runs in results.items()]


def mirroring(settings: Settings, live: Deployment, seconds: float, rounds: int) -> list[dict]:
    port = free_port()
    shadow = serve(settings, live.bento_tag, port, {}, None)
    candidate = Deployment(live.pipeline, "bench-shadow", live.bento_tag, "bench", (port,), time.time())
    url = f"{settings.predict_url}/{live.pipeline}/predict"
    results: dict[str, list[dict]] = {"through Nginx": [], "through Nginx, mirrored": []}
    try:
        for _ in range(rounds):
            for name in results:
                mirrored = name.endswith("mirrored")
                deployments.record_candidate(
                    settings, live.pipeline, candidate if mirrored else None, Traffic("mirror", sample=1.0)
                )
                routes.sync(settings)
                time.sleep(1.5)  # Nginx's graceful reload
                run_client(url, 2)  # warm
                results[name].append(run_client(url, seconds))
    finally:
        deployments.record_candidate(settings, live.pipeline, None)
        routes.sync(settings)
        stop(shadow)
    return [summary(name, runs) for name, runs in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", choices=sorted(BODIES), default="iris")
    args = parser.parse_args()
    global BODY
    BODY = BODIES[args.pipeline]
    settings = Settings.load()
    live = deployments.current(settings, args.pipeline)
    if live is None or deployments.candidate(settings, args.pipeline) is not None:
        raise SystemExit(f"needs {args.pipeline} deployed and no rollout running (flywheel up; an upload)")
    rows = spool(settings, live.bento_tag, args.seconds, args.rounds)
    if args.pipeline == "iris":
        rows += mirroring(settings, live, args.seconds, args.rounds)
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / f"live_overhead_{args.pipeline}.json").write_text(json.dumps(rows, indent=1))
    print(f"\n| c={CONNECTIONS} | req/s, median (range) | p99 ms, median (range) | failed |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['rps']:.0f} ({r['rps_range'][0]:.0f}-{r['rps_range'][1]:.0f}) | "
            f"{r['p99_ms']:.1f} ({r['p99_range'][0]:.1f}-{r['p99_range'][1]:.1f}) | {r['failed']} |"
        )
    base = {r["variant"]: r["rps"] for r in rows}
    print(f"\nspool on / off: {base['spool on'] / base['spool off']:.2f}")
    if "through Nginx" in base:
        print(f"mirrored / plain: {base['through Nginx, mirrored'] / base['through Nginx']:.2f}")


if __name__ == "__main__":
    main()
