"""Benchmark: serving throughput and latency, side by side in one run.

For the iris XGBoost model and the digits CNN, at 1, 8, 32 and 64 connections (wrk):
  raw      the model's own predict in a loop, in-process (no HTTP)
  direct   the live Bento server, straight to its port
  nginx    the same server through Nginx (/<pipeline>/predict)
and, for the CNN, a second server of the same bento with adaptive batching off (direct).
The server is pinned to CPU 0 and wrk to CPU 1, so the numbers are not their fight for one core.

Needs the stack up with iris and digits deployed (`make demo`, then upload digits; this script
uploads the digits sample itself when nothing serves it). Writes bench/results/serving.json and
bench/results/serving.png, and prints a Markdown table.
Run: .venv/platform/bin/python bench/serving.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from flywheel import cli, deploy, loadgen, stack
from flywheel.settings import Settings

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
CONNECTIONS = (1, 8, 32, 64)
BODIES = {"iris": {"inputs": [[5.1, 3.5, 1.4, 0.2]]}, "digits": {"inputs": [[[0.0] * 8 for _ in range(8)]]}}
SERVER_CPU, LOAD_CPU = 0, 1


def pin(pid: int, cpu: int) -> None:
    """Pin a process and all its threads and children."""
    pids = [pid] + [
        int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ]
    for p in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(p)], capture_output=True)


def ensure_deployed(settings: Settings, pipeline: str) -> deploy.Deployment:
    if deploy.current(settings, pipeline) is None:
        suffix = {"iris": "csv", "digits": "npz"}[pipeline]
        sample = cli.make_sample(settings, pipeline, settings.state / "samples" / f"{pipeline}.{suffix}")
        cli.upload(settings, sample, pipeline)
        cli.wait_for_new_version(settings, pipeline, BODIES[pipeline]["inputs"][0], None)
        time.sleep(5)
    return deploy.current(settings, pipeline)


def start_server(settings: Settings, bento_tag: str, port: int, env: dict) -> subprocess.Popen:
    command = [
        "taskset",
        "-c",
        str(SERVER_CPU),
        str(settings.venv_ml / "bin" / "bentoml"),
        "serve",
        bento_tag,
        "--host",
        settings.host,
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        command,
        env={**os.environ, **settings.client_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.wait_healthy(f"{settings.url(port)}/readyz", 180)
    return proc


def sweep(url: str, body: dict, seconds: float) -> list[dict]:
    rows = []
    for c in CONNECTIONS:
        stats = loadgen.run(url, body, c, seconds, cpu=LOAD_CPU)
        rows.append(
            {
                "connections": c,
                "rps": round(stats["rps"], 1),
                "p50_ms": stats["p50_us"] / 1000,
                "p99_ms": stats["p99_us"] / 1000,
                "failed": stats["failed"],
            }
        )
        print(
            f"  {url:<45} c={c:<3} {stats['rps']:8.1f} req/s  p50 {stats['p50_us'] / 1000:6.2f} ms  "
            f"p99 {stats['p99_us'] / 1000:7.2f} ms  failed {stats['failed']}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    settings = Settings.load()
    results: dict = {"connections": CONNECTIONS, "models": {}}
    sup = stack.supervisor(settings)
    nginx_pid = next(p["pid"] for p in sup.getAllProcessInfo() if p["name"] == "nginx")
    pin(nginx_pid, SERVER_CPU)
    for pipeline in ("iris", "digits"):
        d = ensure_deployed(settings, pipeline)
        live_pid = next(p["pid"] for p in sup.getAllProcessInfo() if p["name"] == d.program)
        pin(live_pid, SERVER_CPU)
        body = BODIES[pipeline]
        raw = subprocess.run(
            [str(settings.venv_ml / "bin" / "python"), str(BENCH / "raw_predict.py"), f"{pipeline}:v{d.version}"],
            env={**os.environ, **settings.client_env()},
            capture_output=True,
            text=True,
            check=True,
        )
        model = {"version": d.version, "raw": json.loads(raw.stdout.strip().splitlines()[-1])}
        print(f"{pipeline} v{d.version}: raw {model['raw']['rps']:.0f} predictions/s in-process", flush=True)
        model["direct"] = sweep(f"{settings.url(d.port)}/predict", body, args.seconds)
        model["nginx"] = sweep(f"{settings.predict_url}/{pipeline}/predict", body, args.seconds)
        if pipeline == "digits":
            port = settings.ports.bento_base + 90
            server = start_server(settings, d.bento_tag, port, {"FLYWHEEL_BATCHING": "off"})
            try:
                model["direct_batching_off"] = sweep(f"{settings.url(port)}/predict", body, args.seconds)
            finally:
                os.killpg(server.pid, 15)
                server.wait(30)
        results["models"][pipeline] = model
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    subprocess.run(
        [
            str(settings.venv_ml / "bin" / "python"),
            str(BENCH / "plot_serving.py"),
            str(RESULTS / "serving.json"),
            str(RESULTS / "serving.png"),
        ],
        check=False,
    )


def table(results: dict) -> str:
    lines = [
        "| model | path | " + " | ".join(f"c={c} req/s (p50/p99 ms)" for c in CONNECTIONS) + " |",
        "|---|---|" + "---|" * len(CONNECTIONS),
    ]
    for name, model in results["models"].items():
        lines.append(
            f"| {name} | raw in-process | {model['raw']['rps']:.0f} (p50 {model['raw']['p50_us']:.0f} µs) |"
            + " |" * (len(CONNECTIONS) - 1)
        )
        for path in ("direct", "nginx", "direct_batching_off"):
            if path in model:
                cells = [f"{r['rps']:.0f} ({r['p50_ms']:.1f}/{r['p99_ms']:.1f})" for r in model[path]]
                lines.append(f"| {name} | {path.replace('_', ' ')} | " + " | ".join(cells) + " |")
        if "nginx" in model:
            ratio = [n["rps"] / d["rps"] for n, d in zip(model["nginx"], model["direct"]) if d["rps"]]
            lines.append(f"| {name} | nginx / direct | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")
        if "direct_batching_off" in model:
            ratio = [on["rps"] / off["rps"] for on, off in zip(model["direct"], model["direct_batching_off"])]
            lines.append(f"| {name} | batching on / off | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
