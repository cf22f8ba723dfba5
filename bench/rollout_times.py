"""Benchmark: upload → the new version takes all traffic, per rollout strategy, with the defaults.

On the running stack, a scratch pipeline (a copy of iris) is given each strategy in turn with the
`rollout:` defaults of flywheel/core/pipelines.py; v1 is served first, then for each strategy an
honest upload (the same rows, rotated) is timed from its PUT until every answer of /predict comes
from the new version, while 3 clients ask back to back and label every answer (feedback every
second), as the live judge needs. The rounds are interleaved (bluegreen, canary, shadow, ab, then
again) and each figure is the median with its range. An A/B test whose arms are equal is never
significant: it ends when `max_samples` labelled rows are reached ("production kept"), so its time
is until the decision, whatever it is.

Run: .venv/platform/bin/python bench/rollout_times.py [--rounds 3]   (takes about 10 min per round)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx

from flywheel.clients import objectstore
from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core.settings import Settings
from flywheel.core.waiting import wait_until
from flywheel.serving import live, rollout

BENCH = Path(__file__).resolve().parent
PIPELINE = "iris_bench_rollout"
STRATEGIES = ("bluegreen", "canary", "shadow", "ab")


class Traffic:
    """Clients asking back to back (each request its own id; an X-User-Id from 200 users), and the
    true label of every answer posted as feedback once a second."""

    def __init__(self, settings: Settings, rows: list[tuple[list, str]], clients: int = 3) -> None:
        self.settings, self.rows, self.stop = settings, rows, threading.Event()
        self.answers: dict[str, tuple[float, str, str]] = {}  # request id -> (time, version, label)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.ask, args=(i, clients), daemon=True) for i in range(clients)]
        self.threads.append(threading.Thread(target=self.label, daemon=True))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def ask(self, i: int, step: int) -> None:
        with Client(self.settings) as client:
            while not self.stop.is_set():
                row, label = self.rows[i % len(self.rows)]
                i += step
                rid = uuid.uuid4().hex
                headers = {**client.headers(rid), "X-User-Id": f"user-{i % 200}"}
                try:
                    r = client.http.post(f"/{PIPELINE}/predict", json={"inputs": [row]}, headers=headers)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    with self.lock:
                        self.answers[rid] = (time.time(), r.headers["x-model-version"], label)

    def label(self) -> None:
        sent: set[str] = set()
        with Client(self.settings) as client:
            while not self.stop.wait(1.0):
                with self.lock:
                    due = {rid: a[2] for rid, a in self.answers.items() if rid not in sent and time.time() - a[0] > 2.5}
                for start in range(0, len(due), 1000):
                    batch = dict(list(due.items())[start : start + 1000])
                    try:
                        r = client.feedback(PIPELINE, batch)
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        sent.update(item["request_id"] for item in r.json()["items"] if item["matched"])

    def only(self, version: str, since: float) -> bool:
        """At least 20 answers since `since`, and all of them from `version`."""
        with self.lock:
            recent = [v for at, v, _ in self.answers.values() if at >= since]
        return len(recent) >= 20 and set(recent) == {version}


def newest(settings: Settings) -> str | None:
    """The newest registered version of the scratch pipeline."""
    with MlflowAPI.connect(settings) as mlflow:
        found = mlflow.versions(PIPELINE)
    return found[0]["version"] if found else None


def put(settings: Settings, key: str, body: bytes) -> None:
    objectstore.client(settings, root=True).put_object("datasets", key, io.BytesIO(body), len(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.load()
    text = (settings.pipelines_dir / "iris.yaml").read_text().replace("name: iris", f"name: {PIPELINE}")
    path = settings.pipelines_dir / f"{PIPELINE}.yaml"
    # Iris as scikit-learn ships it, read from the ML environment's files (this one has no sklearn).
    source = next((settings.venv_ml / "lib").glob("python3*/site-packages/sklearn/datasets/data/iris.csv"))
    with source.open() as f:
        reader = csv.reader(f)
        _, _, *names = next(reader)
        table = [[*row[:4], names[int(row[4])]] for row in reader]
    header = "sepal_length,sepal_width,petal_length,petal_width,species"
    lines = [",".join(row) for row in table]
    rows = [([float(v) for v in row[:4]], row[4]) for row in table]
    results: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    path.write_text(text)
    try:
        with Client(settings) as client:
            wait_until(
                lambda: (
                    client.http.post(f"/{PIPELINE}/predict", json={"inputs": [rows[0][0]]}).status_code in (200, 503)
                ),
                180,
                "the pipeline routed",
                interval=2,
            )
        put(settings, f"{PIPELINE}/v0.csv", "\n".join([header, *lines]).encode())
        with Client(settings) as client:
            client.wait_for_version(PIPELINE, rows[0][0], None)
        k = 0
        for _ in range(args.rounds):
            for strategy in STRATEGIES:
                path.write_text(text + f"rollout:\n  strategy: {strategy}\n")
                time.sleep(12)  # the DAG file re-parsed (the judge reads the file at each look anyway)
                k += 1
                rotated = lines[k * 7 % len(lines) :] + lines[: k * 7 % len(lines)]
                before = newest(settings)
                with Traffic(settings, rows) as traffic:
                    time.sleep(3)
                    started = time.time()
                    put(settings, f"{PIPELINE}/r{k}.csv", "\n".join([header, *rotated]).encode())
                    new = wait_until(
                        lambda before=before: (v := newest(settings)) != before and v,
                        600,
                        f"{PIPELINE} trained",
                        interval=1,
                    )
                    if strategy == "ab":
                        wait_until(
                            lambda new=new: (
                                (s := live.load(settings, PIPELINE)) and s.version == new and s.status != live.RUNNING
                            ),
                            1800,
                            f"the A/B test of v{new} decided",
                            interval=1,
                        )
                        ended = time.time()
                    else:
                        wait_until(
                            lambda new=new: traffic.only(new, time.time() - 2),
                            1800,
                            f"v{new} taking all traffic ({strategy})",
                            interval=0.5,
                        )
                        ended = time.time() - 2
                results[strategy].append(ended - started)
                print(f"{strategy:<10} v{new}: {ended - started:.1f} s", flush=True)
    finally:
        path.unlink(missing_ok=True)
        rollout.retire(settings, PIPELINE)
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "rollout_times.json").write_text(json.dumps(results, indent=1))
    print("\n| strategy (defaults) | upload → all traffic (s), median (range) |")
    print("|---|---|")
    for strategy, times in results.items():
        print(f"| {strategy} | {statistics.median(times):.0f} ({min(times):.0f}-{max(times):.0f}) |")


if __name__ == "__main__":
    main()
