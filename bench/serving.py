"""Benchmark: every serving path against the HTTP floor, side by side in one run.

iris (XGBoost, one row per request), at 1, 8, 32 and 64 connections:
  raw          the Booster in-process, no HTTP (bench/raw_predict.py)
  floor        bench/floor_app.py, the smallest ASGI app with the same Booster and the same JSON,
               under uvicorn + uvloop + httptools: one replica direct, and two behind Nginx
  bento        one live replica direct, and the live replica set through the stack's Nginx
Each Bento path is reported as a ratio to the floor in the same layout. Direct paths run the server
on CPU 0 and the load on CPU 1; the sets use both cores for their two replicas, so Nginx and the
load generator share them (on more cores, give each replica its own core and the load its own).
Latency comes twice: wrk's percentiles (corrected for coordinated omission) and bench/client.py's
(each request's own time).

mnist (the 28x28 CNN, one image per request): the live replica with adaptive batching as deployed,
against a server of the same bento with batching off, both direct, at 1, 8, 32 and 64 connections.

Needs the stack up with iris and mnist deployed (it uploads their samples when nothing serves them).
Writes bench/results/serving.json and prints Markdown tables.
Run: .venv/platform/bin/python bench/serving.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flywheel.clients import load as loadgen
from flywheel.clients.api import Client
from flywheel.core.settings import Settings
from flywheel.platform import deployments, reaper, routes, stack, supervisor, topology
from flywheel.training import samples

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
CONNECTIONS = (1, 8, 32, 64)
IRIS = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
MNIST = {"inputs": [[[0.0] * 28 for _ in range(28)]]}
SERVER_CPU, LOAD_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_deployed(settings: Settings, pipeline: str, body: dict) -> deployments.Deployment:
    if deployments.current(settings, pipeline) is None:
        suffix = {"iris": ".csv", "mnist": ""}[pipeline]
        sample = samples.make(settings, pipeline, settings.state / "samples" / f"{pipeline}{suffix}")
        with Client(settings) as client:
            client.upload(sample, pipeline)
            client.wait_for_version(pipeline, body["inputs"][0], None)
        time.sleep(5)
    return deployments.current(settings, pipeline)


def measure(url: str, body: dict, connections: int, seconds: float, cpu: int | None) -> dict:
    wrk = loadgen.run(url, body, connections, seconds, cpu=cpu)
    command = [
        sys.executable,
        str(BENCH / "client.py"),
        url,
        json.dumps(body),
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
    ]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    plain = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    row = {
        "connections": connections,
        "rps": round(wrk["rps"], 1),
        "p50_ms": wrk["p50_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "client_rps": round(plain["rps"], 1),
        "client_p99_ms": plain["p99_ms"],
        "failed": wrk["failed"] + plain["failed"],
    }
    print(
        f"  {url:<42} c={connections:<3} {row['rps']:7.0f} req/s  p99 {row['p99_ms']:6.1f} ms (wrk) "
        f"{row['client_p99_ms']:6.1f} ms (client)  failed {row['failed']}",
        flush=True,
    )
    return row


def sweep(url: str, body: dict, seconds: float, cpu: int | None) -> list[dict]:
    loadgen.run(url, body, 1, 2, cpu=cpu)  # warm
    return [measure(url, body, c, seconds, cpu) for c in CONNECTIONS]


def start(command: list[str], env: dict, cpu: int, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["taskset", "-c", str(cpu), *command],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.wait_healthy(ready, 180)
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def floor_servers(settings: Settings, model_tag: str, cpus: list[int]) -> tuple[list[subprocess.Popen], list[int]]:
    ports = [free_port() for _ in cpus]
    env = {**settings.client_env(), "FLOOR_MODEL": model_tag}
    procs = [
        start(
            [
                str(settings.venv_ml / "bin" / "uvicorn"),
                "floor_app:app",
                "--app-dir",
                str(BENCH),
                "--host",
                settings.host,
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env,
            cpu,
            f"{settings.url(port)}/",
        )
        for port, cpu in zip(ports, cpus)
    ]
    return procs, ports


def bench_nginx(settings: Settings, ports: list[int], folder: Path) -> tuple[subprocess.Popen, int]:
    """An Nginx in front of the floor replicas, configured as the stack's is in front of the Bentos."""
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {folder}/nginx.pid; error_log stderr error;
{"user nobody nogroup;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body; proxy_temp_path {folder}/proxy;
    {routes.upstream_conf("floor", settings.host, ports)}
    server {{
        listen {settings.host}:{port};
        keepalive_timeout 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        location / {{ proxy_pass http://flywheel_floor; }}
    }}
}}
""")
    proc = subprocess.Popen(
        [topology.binary("nginx"), "-c", str(conf)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    return proc, port


def cores_of(settings: Settings, d: deployments.Deployment) -> list[str]:
    """Each replica's worker: the CPUs it may run on and the one it ran on last."""
    seen = []
    for name in d.programs:
        pid = supervisor.rpc(settings).getProcessInfo(name)["pid"]
        for child in [pid, *(p.pid for p in reaper.snapshot().values() if p.ppid == pid)]:
            stat = Path(f"/proc/{child}/stat").read_text()
            last = stat[stat.rindex(")") + 2 :].split()[36]
            seen.append(
                f"{name.split(':')[-1]} pid {child}: allowed {sorted(os.sched_getaffinity(child))}, last {last}"
            )
    return seen


def iris(settings: Settings, seconds: float) -> dict:
    d = ensure_deployed(settings, "iris", IRIS)
    model_tag = f"iris:v{d.version}"
    raw = subprocess.run(
        [str(settings.venv_ml / "bin" / "python"), str(BENCH / "raw_predict.py"), model_tag],
        env={**os.environ, **settings.client_env()},
        capture_output=True,
        text=True,
        check=True,
    )
    result = {"version": d.version, "raw": json.loads(raw.stdout.strip().splitlines()[-1])}
    print(f"iris v{d.version}: raw Booster {result['raw']['rps']:.0f} predictions/s in-process", flush=True)
    procs, ports = floor_servers(settings, model_tag, [SERVER_CPU])
    try:
        result["floor_direct"] = sweep(f"{settings.url(ports[0])}/", IRIS, seconds, LOAD_CPU)
    finally:
        stop(*procs)
    # Replica 0 is pinned to CPU 0 by the deploy step; replica 1 (CPU 1) idles meanwhile.
    result["bento_direct"] = sweep(f"{settings.url(d.ports[0])}/predict", IRIS, seconds, LOAD_CPU)
    procs, ports = floor_servers(settings, model_tag, [0, 1])
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        nginx, port = bench_nginx(settings, ports, Path(folder))
        try:
            result["floor_set"] = sweep(f"{settings.url(port)}/", IRIS, seconds, None)
        finally:
            stop(nginx, *procs)
    result["bento_set"] = sweep(f"{settings.predict_url}/iris/predict", IRIS, seconds, None)
    result["cores"] = cores_of(settings, d)
    return result


def mnist(settings: Settings, seconds: float) -> dict:
    d = ensure_deployed(settings, "mnist", MNIST)
    result = {
        "version": d.version,
        "batching_on": sweep(f"{settings.url(d.ports[0])}/predict", MNIST, seconds, LOAD_CPU),
    }
    port = free_port()
    command = [
        str(settings.venv_ml / "bin" / "bentoml"),
        "serve",
        d.bento_tag,
        "--host",
        settings.host,
        "--port",
        str(port),
    ]
    server = start(
        command, {**settings.client_env(), "FLYWHEEL_BATCHING": "off"}, SERVER_CPU, f"{settings.url(port)}/readyz"
    )
    try:
        result["batching_off"] = sweep(f"{settings.url(port)}/predict", MNIST, seconds, LOAD_CPU)
    finally:
        stop(server)
    return result


def tables(results: dict) -> str:
    head = " | ".join(f"c={c}" for c in CONNECTIONS)
    iris = results["iris"]
    raw = iris["raw"]
    lines = [
        f"iris v{iris['version']}: raw Booster {raw['rps']:.0f} predictions/s (p50 {raw['p50_us']:.0f} µs)",
        "",
        f"| path | {head} |",
        "|---|" + "---|" * len(CONNECTIONS),
    ]
    for path in ("floor_direct", "bento_direct", "floor_set", "bento_set"):
        cells = [f"{r['rps']:.0f} ({r['p99_ms']:.1f} / {r['client_p99_ms']:.1f})" for r in iris[path]]
        lines.append(f"| {path.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for bento, floor in (("bento_direct", "floor_direct"), ("bento_set", "floor_set")):
        ratios = [b["rps"] / f["rps"] for b, f in zip(iris[bento], iris[floor])]
        lines.append(f"| {bento.replace('_', ' ')} / floor | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    lines += ["", "req/s (p99 ms: wrk, corrected / client, uncorrected)", "", *iris["cores"]]
    m = results["mnist"]
    lines += [
        "",
        f"mnist v{m['version']}, one 28x28 image per request, one replica direct:",
        "",
        f"| batching | {head} |",
        "|---|" + "---|" * len(CONNECTIONS),
    ]
    for path in ("batching_on", "batching_off"):
        cells = [f"{r['rps']:.0f} ({r['p99_ms']:.0f} / {r['client_p99_ms']:.0f})" for r in m[path]]
        lines.append(f"| {path.split('_')[1]} | " + " | ".join(cells) + " |")
    ratios = [on["rps"] / off["rps"] for on, off in zip(m["batching_on"], m["batching_off"])]
    lines.append("| on / off | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    settings = Settings.load()
    results = {"connections": CONNECTIONS, "iris": iris(settings, args.seconds), "mnist": mnist(settings, args.seconds)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=1))
    print("\n" + tables(results))


if __name__ == "__main__":
    main()
