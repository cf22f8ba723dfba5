"""Benchmark: upload -> new version answering /predict, on the running embedded stack.

Run `make up` first, then `.venv/platform/bin/python bench/upload_to_serving.py [--runs 3]`.
Interleaves uploads in set-ups: `warm` (as the stack runs: steps forked by the step server, MinIO's
event sent at once, the scheduler acting on a commit at once), `plain` (warm, but the scheduler as
Airflow ships it: a change waits for its next loop, and each task imports its code itself;
flywheel/orchestration/sqlite_scheduler.py and airflow_main.py),
`queued` (warm, but MinIO's event only through its queue dir, replayed every 3 s: the platform before
its second webhook target) and `cold` (the step server stopped).
Prints each run's seconds, the waterfall's median per hop for each (`flywheel lineage --timings`:
the services' own records), the idle stack's CPU before each upload, and the stack's memory (PSS,
shared pages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from flywheel.clients.api import Client
from flywheel.core.settings import Settings
from flywheel.core.waiting import wait_until
from flywheel.operations import timings
from flywheel.orchestration import stepserver
from flywheel.platform import provision, stack, supervisor, topology
from flywheel.platform.topology import WEBHOOK_ID, WEBHOOK_IDS
from flywheel.training import samples

ROW = [5.1, 3.5, 1.4, 0.2]


def stack_processes(settings: Settings):
    """/proc's folder of every live process started for this state folder (found by its environment)."""
    marker = f"FLYWHEEL_STATE_DIR={settings.state}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                yield proc
        except OSError:
            continue


def stack_memory_mib(settings: Settings) -> tuple[float, int]:
    """Total PSS of every process started for this state folder, and how many there are."""
    total_kib, count = 0, 0
    for proc in stack_processes(settings):
        try:
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
                    count += 1
        except OSError:
            continue
    return total_kib / 1024, count


def stack_cpu_ticks(settings: Settings) -> dict[int, int]:
    """CPU ticks (user + system) used so far by each live process started for this state folder."""
    ticks = {}
    for proc in stack_processes(settings):
        try:
            fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
            ticks[int(proc.name)] = int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return ticks


def idle_cpu_percent(settings: Settings, seconds: float = 20) -> float:
    """The idle stack's CPU use, as % of one core, over `seconds` with nothing asked of it: what each
    process alive at both ends used meanwhile (one that exits in between takes its count with it)."""
    before = stack_cpu_ticks(settings)
    time.sleep(seconds)
    after = stack_cpu_ticks(settings)
    used = sum(after[pid] - before[pid] for pid in after.keys() & before.keys())
    return used / os.sysconf("SC_CLK_TCK") / seconds * 100


def listening(settings: Settings) -> bool:
    try:
        stepserver.check(settings.step_socket)
    except OSError:
        return False
    return True


def set_step_server(settings: Settings, warm: bool) -> None:
    """Warm: the step server running (steps forked from it); cold: stopped (steps start cold)."""
    rpc = supervisor.rpc(settings)
    state = rpc.getProcessInfo("step-server")["statename"]
    if warm and state != "RUNNING":
        rpc.startProcess("step-server", True)
        wait_until(lambda: listening(settings), 60, "the step server listening (after its preload)")
    elif not warm and state == "RUNNING":
        rpc.stopProcess("step-server", True)


PLAIN = "\n[flywheel]\nquick_scheduler = False\n"


def set_scheduler(settings: Settings, at_once: bool) -> None:
    """The scheduler with or without Flywheel's changes: airflow.cfg says, read at its restart."""
    cfg = settings.airflow_home / "airflow.cfg"
    text = cfg.read_text()
    if at_once == (PLAIN not in text):
        return
    cfg.write_text(text.replace(PLAIN, "") if at_once else text + PLAIN)
    rpc = supervisor.rpc(settings)
    rpc.stopProcess("airflow-scheduler", True)
    rpc.startProcess("airflow-scheduler", True)
    health = {svc.name: svc.health for svc in topology.services(settings)}["airflow-scheduler"]
    stack.wait_healthy(health, 60, "airflow-scheduler")


def set_variant(settings: Settings, variant: str) -> None:
    set_scheduler(settings, variant != "plain")
    set_step_server(settings, variant != "cold")
    provision.notifications(settings, (WEBHOOK_ID,) if variant == "queued" else WEBHOOK_IDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="uploads per variant")
    parser.add_argument("--variants", default="warm,plain", help="set-ups to interleave: warm, plain, queued, cold")
    args = parser.parse_args()
    settings = Settings.load()
    variants = [v for v in args.variants.split(",") if v]
    sample = settings.state / "samples" / "bench-iris.csv"
    times: dict[str, list[float]] = {v: [] for v in variants}
    hops: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    idle: dict[str, list[float]] = {v: [] for v in variants}
    client = Client(settings)
    for i in range(args.runs):
        for variant in variants:
            set_variant(settings, variant)
            idle[variant].append(idle_cpu_percent(settings, 10))
            samples.make(settings, "iris", sample, seed=1000 + i)
            before = client.served_version("iris", ROW)
            started = time.monotonic()
            client.upload(sample, "iris", f"bench-{int(time.time())}-{variant}-{i}.csv")
            version = client.wait_for_version("iris", ROW, before, interval=0.1)
            times[variant].append(time.monotonic() - started)
            print(f"{variant} run {i + 1}: v{before} -> v{version} in {times[variant][-1]:.1f}s", flush=True)
            waterfall = timings.waterfall(settings, "iris", version)
            print(timings.render(waterfall), flush=True)
            for hop in waterfall["hops"]:
                hops[variant].setdefault(hop["name"], []).append(hop["seconds"])
            hops[variant].setdefault("total (services' records)", []).append(waterfall["total_seconds"])
            hops[variant].setdefault("upload -> answer (this client)", []).append(times[variant][-1])
            time.sleep(5)  # the old colour drained and stopped before the next upload
    set_variant(settings, "warm")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})" if values else "-"

    names = list(dict.fromkeys(name for v in variants for name in hops[v]))
    print(f"\n| hop | {' | '.join(f'{v}: median s (range), {args.runs} uploads' for v in variants)} |")
    print(f"|---|{'---|' * len(variants)}")
    for name in names:
        print(f"| {name} | {' | '.join(cell(hops[v].get(name, [])) for v in variants)} |")
    print(f"| idle stack CPU, % of a core (10 s before each upload) | {' | '.join(cell(idle[v]) for v in variants)} |")
    memory, processes = stack_memory_mib(settings)
    print(
        json.dumps(
            {
                "upload_to_serving_s": {v: [round(t, 1) for t in times[v]] for v in variants},
                "median_s": {v: round(statistics.median(times[v]), 1) for v in variants},
                "stack_pss_mib": round(memory),
                "processes": processes,
            }
        )
    )


if __name__ == "__main__":
    main()
