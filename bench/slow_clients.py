"""Benchmark: Nginx's memory under 1,024 slow clients, each holding a request body half-sent.

Each client sends a POST's headers with the Content-Length of a large legal request, then part of
the body, then nothing (a slow or stalled uploader), until all of them hold at once. Measured from
/proc while they hold: the Nginx processes' PSS against the same processes idle just before, and
the bytes spooled into Nginx's private body folder. Two routes, interleaved run by run:

  iris   body limit 213 KB, buffer = limit: every legal table request is read into memory
  mnist  body limit 6.6 MB, buffer 256 KB (flywheel/platform/routes.py BODY_BUFFER): the rest of
         an image request is spooled to disk, so memory per client is bounded by the buffer

Before per-pipeline limits, every route's buffer was MNIST's 6.6 MB: 1,024 such clients could hold
6.6 GB of Nginx's memory. Needs the stack up with iris and mnist served (uploads their samples
if not). Run: .venv/platform/bin/python bench/slow_clients.py [--clients 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from flywheel.core import pipelines
from flywheel.core.settings import Settings
from flywheel.platform import configs, routes, supervisor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ensure_deployed  # bench/serving.py: upload the sample if nothing serves it

ROUTES = {"iris": 200 * 1024, "mnist": 1024 * 1024}  # bytes each client sends before it stalls
BODIES = {"iris": {"inputs": [[5.1, 3.5, 1.4, 0.2]]}, "mnist": {"inputs": [[[0] * 28] * 28]}}


def nginx_pids(settings: Settings) -> list[int]:
    master = supervisor.rpc(settings).getProcessInfo("nginx")["pid"]
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == master]
    return [master, *children]


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def spooled_mib(settings: Settings) -> float:
    folder = configs.nginx_temp(settings) / "body"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20 if folder.exists() else 0.0


async def hold(settings: Settings, pipeline: str, clients: int, sent: int, limit: int) -> dict:
    """`clients` connections, each with `sent` bytes of a `limit`-byte body, measured while all hold."""
    pids = nginx_pids(settings)
    idle = pss_mib(pids)
    host, port = settings.host, settings.ports.nginx
    head = (
        f"POST /{pipeline}/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit}\r\n\r\n"
    ).encode()
    chunk = b" " * sent  # JSON allows leading white space: a legal prefix of a legal body

    async def one() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(head + chunk)
        await writer.drain()
        return writer

    started = time.monotonic()
    writers = []
    for batch in range(0, clients, 128):  # inside Nginx's listen backlog
        writers += await asyncio.gather(*(one() for _ in range(min(128, clients - batch))))
    await asyncio.sleep(3)  # Nginx reads what each has sent
    held = {"pss": pss_mib(pids), "spooled": spooled_mib(settings), "seconds": time.monotonic() - started}
    for writer in writers:
        writer.close()
    await asyncio.sleep(2)
    return {
        "route": pipeline,
        "clients": clients,
        "sent_kib": sent // 1024,
        "limit_kib": limit // 1024,
        "buffer_kib": routes.body_buffer(limit) // 1024,
        "idle_pss_mib": round(idle, 1),
        "held_pss_mib": round(held["pss"], 1),
        "per_client_kib": round((held["pss"] - idle) * 1024 / clients, 1),
        "spooled_mib": round(held["spooled"], 1),
        "after_pss_mib": round(pss_mib(pids), 1),
    }


def span(rows: list[dict], key: str) -> str:
    """Median (min to max) of the runs."""
    values = [r[key] for r in rows]
    return f"{statistics.median(values):,} ({min(values):,} to {max(values):,})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.load()
    limits = {}
    for name in ROUTES:
        ensure_deployed(settings, name, BODIES[name])
        limits[name] = routes.body_limit(pipelines.get(settings.pipelines_dir, name))
    results = []
    for run in range(args.runs):
        for name, sent in ROUTES.items():  # interleaved: iris, mnist, iris, mnist, ...
            result = asyncio.run(hold(settings, name, args.clients, min(sent, limits[name] - 1), limits[name]))
            print(json.dumps({"run": run, **result}), flush=True)
            results.append(result)
    header = "| route | body limit | buffer | sent per client | Nginx PSS (MiB) | per client (KiB) | on disk (MiB) |"
    print(f"\n{header}\n|---|---|---|---|---|---|---|")
    for name in ROUTES:
        rows = [r for r in results if r["route"] == name]
        first = rows[0]
        print(
            f"| {name} | {first['limit_kib']:,} KiB | {first['buffer_kib']:,} KiB | {first['sent_kib']:,} KiB | "
            f"{span(rows, 'held_pss_mib')} | {span(rows, 'per_client_kib')} | {span(rows, 'spooled_mib')} |"
        )
    out = Path(__file__).parent / "results" / "slow_clients.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
