"""An uncorrected load client: each request's own latency, beside wrk's corrected percentiles.

wrk 4 corrects its percentiles for coordinated omission: a 100 ms stall once a second shows as a
p99 of ~100 ms even when 99 % of requests took 3 ms. This client records what each request took
(closed loop, N connections, keep-alive, one process, raw sockets), so the two read side by side.

    .venv/platform/bin/python bench/client.py URL BODY_JSON --connections 1 --seconds 8  -> one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


async def _connection(host: str, port: int, request: bytes, stop: float, latencies: list[float], errors: list[int]):
    reader = writer = None
    while time.perf_counter() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 2"):
                errors[0] += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            errors[0] += 1
            writer = None
    if writer is not None:
        writer.close()


async def run(url: str, body: bytes, connections: int, seconds: float) -> dict:
    parts = urlsplit(url)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors = [0]
    started = time.perf_counter()
    stop = started + seconds
    await asyncio.gather(
        *(_connection(parts.hostname, parts.port, request, stop, latencies, errors) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "failed": errors[0],
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("body")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.url, args.body.encode(), args.connections, args.seconds))))


if __name__ == "__main__":
    main()
