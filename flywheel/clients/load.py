"""Load generation with wrk: one run, its numbers parsed (used by the benchmarks and the rollout test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

from flywheel.core.settings import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "wrk" / "predict.lua"


def wrk_command(
    url: str, body: dict, connections: int, seconds: float, cpu: int | None = None, api_key: str = ""
) -> tuple[list[str], dict]:
    threads = max(1, min(2, connections))  # wrk refuses more threads than connections
    command = [
        shutil.which("wrk") or "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(SCRIPT),
        url,
    ]
    if cpu is not None:  # keep the load generator off the server's core, or we measure their fight
        command = ["taskset", "-c", str(cpu), *command]
    return command, {**os.environ, "WRK_BODY": json.dumps(body), "WRK_API_KEY": api_key}


def parse(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            stats = json.loads(line.removeprefix("WRK_JSON "))
            stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
            stats["failed"] = sum(
                stats[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx")
            )
            return stats
    raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")


def run(url: str, body: dict, connections: int, seconds: float, cpu: int | None = None, api_key: str = "") -> dict:
    command, env = wrk_command(url, body, connections, seconds, cpu, api_key)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return parse(out.stdout)


def start(url: str, body: dict, connections: int, seconds: float, api_key: str = "") -> subprocess.Popen:
    """Load in the background, for at most `seconds`; `finish` waits for it (`stop` ends it first) and
    parses its numbers."""
    command, env = wrk_command(url, body, connections, seconds, api_key=api_key)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> dict:
    output, _ = proc.communicate()
    return parse(output)


def stop(proc: subprocess.Popen) -> dict:
    """End the load now (wrk stops at SIGINT and still prints its numbers), and parse them."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    return finish(proc)
