"""Benchmark: what each step of the Bento's tuning buys, side by side in one run.

One replica of the live iris bento, started here on a spare port, pinned to CPU 0, with wrk and the
uncorrected client on CPU 1. Each row adds one step to the row above, from the Bento as it was
deployed before this work to the Bento as it ships now:

  before        OpenTelemetry spans, BentoML's access log, the un-cancelled timeout timers, asyncio + h11
  +uvloop       uvicorn's uvloop loop and httptools parser (locks/ml.txt installs them)
  +timer fix    provenance.py cancels the timeout middleware's per-request timer
  +no access    BentoML's access log off (a request-log file written once a second instead)
  shipped       OpenTelemetry's middleware skipped for every URL (nothing exports traces)

Needs the stack up with iris deployed. Run: .venv/platform/bin/python bench/bento_tuning.py [--seconds 8]
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
from pathlib import Path

from flywheel.clients import load as loadgen
from flywheel.core.settings import Settings
from flywheel.platform import deployments, stack

BENCH = Path(__file__).resolve().parent
BODY = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
SERVER_CPU, LOAD_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def variants(hide: Path) -> list[tuple[str, dict[str, str]]]:
    trace_on = 'services.Predictor.tracing.excluded_urls=""'
    access_on = "services.Predictor.logging.access.enabled=true"
    return [
        (
            "before",
            {"BENTOML_CONFIG_OPTIONS": f"{trace_on} {access_on}", "FLYWHEEL_TIMER_FIX": "off", "PYTHONPATH": str(hide)},
        ),
        ("+uvloop", {"BENTOML_CONFIG_OPTIONS": f"{trace_on} {access_on}", "FLYWHEEL_TIMER_FIX": "off"}),
        ("+timer fix", {"BENTOML_CONFIG_OPTIONS": f"{trace_on} {access_on}"}),
        ("+no access log", {"BENTOML_CONFIG_OPTIONS": trace_on}),
        ("shipped", {}),
    ]


def measure(url: str, connections: int, seconds: float) -> dict:
    wrk = loadgen.run(url, BODY, connections, seconds, cpu=LOAD_CPU)
    client = subprocess.run(
        [
            "taskset",
            "-c",
            str(LOAD_CPU),
            sys.executable,
            str(BENCH / "client.py"),
            url,
            json.dumps(BODY),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    plain = json.loads(client.stdout)
    return {
        "rps": wrk["rps"],
        "p99_ms": wrk["p99_us"] / 1000,
        "client_p99_ms": plain["p99_ms"],
        "failed": wrk["failed"] + plain["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    settings = Settings.load()
    live = deployments.current(settings, "iris")
    port = free_port()
    url = f"{settings.url(port)}/predict"
    rows = []
    with tempfile.TemporaryDirectory() as hide:
        for module in ("uvloop", "httptools"):  # uvicorn's "auto" falls back to asyncio and h11
            Path(hide, f"{module}.py").write_text("raise ImportError('hidden by bench/bento_tuning.py')\n")
        for name, env in variants(Path(hide)):
            server = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(SERVER_CPU),
                    str(settings.venv_ml / "bin" / "bentoml"),
                    "serve",
                    live.bento_tag,
                    "--host",
                    settings.host,
                    "--port",
                    str(port),
                ],
                env={**os.environ, **settings.client_env(), **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                stack.wait_healthy(f"{settings.url(port)}/readyz", 120)
                loadgen.run(url, BODY, 1, 2, cpu=LOAD_CPU)  # warm
                for c in (1, 32):
                    row = {"variant": name, "connections": c, **measure(url, c, args.seconds)}
                    rows.append(row)
                    print(
                        f"{name:<15} c={c:<3} {row['rps']:7.0f} req/s  p99 {row['p99_ms']:6.1f} ms (wrk) "
                        f"{row['client_p99_ms']:6.1f} ms (client)  failed {row['failed']}",
                        flush=True,
                    )
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "bento_tuning.json").write_text(json.dumps(rows, indent=1))
    print("\n| step | c=1 req/s | c=1 p99 ms (wrk / client) | c=32 req/s | c=32 p99 ms (wrk / client) |")
    print("|---|---|---|---|---|")
    for name, _ in variants(Path()):
        one, many = (next(r for r in rows if r["variant"] == name and r["connections"] == c) for c in (1, 32))
        print(
            f"| {name} | {one['rps']:.0f} | {one['p99_ms']:.1f} / {one['client_p99_ms']:.1f} | {many['rps']:.0f} | "
            f"{many['p99_ms']:.1f} / {many['client_p99_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
