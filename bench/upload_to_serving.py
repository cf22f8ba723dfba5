"""Benchmark: upload -> new version answering /predict, on the running embedded stack.

Run `make up` first, then `.venv/platform/bin/python bench/upload_to_serving.py [--runs 3]`.
Prints each run's seconds, the median, the running stack's memory (PSS, shared pages counted once), and
the waterfall's median per hop over the runs (`flywheel lineage --timings`: the services' own records).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from flywheel.clients.api import Client
from flywheel.core.settings import Settings
from flywheel.operations import timings
from flywheel.training import samples

ROW = [5.1, 3.5, 1.4, 0.2]


def stack_memory_mib(settings: Settings) -> tuple[float, int]:
    """Total PSS of every process started for this state folder, and how many there are."""
    marker = f"FLYWHEEL_STATE_DIR={settings.state}".encode()
    total_kib, count = 0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
                    count += 1
        except OSError:
            continue
    return total_kib / 1024, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.load()
    sample = settings.state / "samples" / "bench-iris.csv"
    times = []
    hops: dict[str, list[float]] = {}
    client = Client(settings)
    for i in range(args.runs):
        samples.make(settings, "iris", sample, seed=1000 + i)
        before = client.served_version("iris", ROW)
        started = time.monotonic()
        client.upload(sample, "iris", f"bench-{int(time.time())}-{i}.csv")
        version = client.wait_for_version("iris", ROW, before)
        times.append(time.monotonic() - started)
        print(f"run {i + 1}: v{before} -> v{version} in {times[-1]:.1f}s", flush=True)
        waterfall = timings.waterfall(settings, "iris", version)
        print(timings.render(waterfall), flush=True)
        for hop in waterfall["hops"]:
            hops.setdefault(hop["name"], []).append(hop["seconds"])
        hops.setdefault("total (services' records)", []).append(waterfall["total_seconds"])
    print(f"\n| hop | median s (range), {args.runs} uploads |\n|---|---|")
    for name, values in hops.items():
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")
    memory, processes = stack_memory_mib(settings)
    print(
        json.dumps(
            {
                "upload_to_serving_s": [round(t, 1) for t in times],
                "median_s": round(statistics.median(times), 1),
                "stack_pss_mib": round(memory),
                "processes": processes,
            }
        )
    )


if __name__ == "__main__":
    main()
