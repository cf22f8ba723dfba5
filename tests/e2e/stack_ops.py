"""What the end-to-end tests do to the real stack: upload, wait, predict, kill, and look for orphans."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import time
from pathlib import Path

import httpx

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.core import schema, waiting
from flywheel.core.settings import Settings
from flywheel.platform import reaper, supervisor

DEADLINE = 600  # seconds for one upload to be served; CI is a cold 2-core machine
IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_rows() -> list[list]:
    """Iris as scikit-learn ships it, read from the ML venv's files (the platform env has no sklearn)."""
    settings = Settings.load()
    path = next((settings.venv_ml / "lib").glob("python3*/site-packages/sklearn/datasets/data/iris.csv"))
    with path.open() as f:
        reader = csv.reader(f)
        _, _, *names = next(reader)
        return [[float(v) for v in row[:4]] + [names[int(row[4])]] for row in reader]


ROWS = iris_rows()
HOLDOUT = ROWS[::5]  # every fifth row never reaches training: the served model's accuracy is measured on it
TRAINING = [r for i, r in enumerate(ROWS) if i % 5]
ROW = HOLDOUT[0][:4]


def csv_bytes(rows: list[list], columns=(*IRIS_COLUMNS, "species")) -> bytes:
    lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def put(settings: Settings, key: str, body: bytes, bucket: str = "datasets") -> dict:
    result = minio_client(settings, root=True).put_object(
        bucket, key, io.BytesIO(body), len(body), content_type="text/csv"
    )
    return {"key": key, "etag": result.etag, "version_id": result.version_id}


def predict(settings: Settings, body, path: str = "/iris/predict", **kwargs) -> httpx.Response:
    return httpx.post(f"{settings.predict_url}{path}", timeout=30, **({"json": body} if body is not None else kwargs))


def served(settings: Settings, pipeline: str = "iris", row=None) -> dict | None:
    """The answer's model and dataset, or None while nothing serves."""
    with Client(settings) as client:
        return client.served(pipeline, row or ROW)


def wait_until(condition, timeout: float, what: str, interval: float = 2.0):
    """The platform's own wait, polling every 2 s by default: the tests' polls are not what is measured."""
    return waiting.wait_until(condition, timeout, what, interval)


def nginx_reloaded(settings: Settings) -> bool:
    """Whether Nginx's last reload is over, as /proc shows it: its master has one worker that takes
    connections. A reload starts the new worker and tells the old one to stop 100 ms later (Nginx's
    master sleeps between), so just after a first answer from the new routes a request may still reach
    the old ones; the old worker renames itself "worker process is shutting down" as it stops accepting."""
    titles = []
    for pid in descendants(program_pid(settings, "nginx")):
        with contextlib.suppress(OSError):
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return sum(b"worker process" in t and b"shutting down" not in t for t in titles) == 1


def wait_first_served(settings: Settings, pipeline: str, row=None) -> dict:
    """The pipeline's first answer through Nginx, once every request gets it: until then the route
    answers 503 "no model ... serving yet"."""
    body = wait_until(lambda: served(settings, pipeline, row), DEADLINE, f"{pipeline} v1 served")
    wait_until(lambda: nginx_reloaded(settings), 10, "Nginx's old worker gone", interval=0.05)
    return body


def wait_for_version(settings: Settings, not_version: str | None, pipeline: str = "iris") -> dict:
    def changed():
        body = served(settings, pipeline)
        return body if body and body["model"]["version"] != not_version else None

    return wait_until(changed, DEADLINE, f"a {pipeline} version other than {not_version} served")


def settled_runs(api: AirflowAPI, dag_id: str, timeout: float = 240) -> list[dict]:
    """The DAG's runs once none is queued or running."""
    return wait_until(
        lambda: (runs := api.dag_runs(dag_id)) and all(r["state"] in ("success", "failed") for r in runs) and runs,
        timeout,
        f"{dag_id} has no unfinished run",
    )


def mlflow_runs(settings: Settings, experiment: str, filter_string: str = "") -> list[dict]:
    with MlflowAPI.connect(settings) as mlflow:
        return mlflow.search_runs(experiment, filter_string, max_results=1000)


# --- processes ------------------------------------------------------------------------------------


def program_pid(settings: Settings, name: str) -> int:
    return supervisor.rpc(settings).getProcessInfo(name)["pid"]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def orphans(settings: Settings) -> list[str]:
    """Live processes started for this stack (FLYWHEEL_STATE_DIR in their environment, as /proc shows
    it) that do not descend from supervisord: read from /proc here, not with the reaper's own code."""
    supervisord = int((settings.state / "supervisord.pid").read_text())
    marker = f"FLYWHEEL_STATE_DIR={settings.state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (os.getpid(), supervisord):
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().split(") ")[1].startswith(("Z", "X")):
                continue  # a zombie holds nothing
        except OSError:
            continue
        pid, seen = int(proc.name), set()
        while pid not in (None, 0, 1, supervisord) and pid not in seen:
            seen.add(pid)
            pid = _ppid(pid)
        if pid != supervisord:
            found.append(_describe(int(proc.name)))
    return found


def _describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return f"{pid}: {command[:120]}"
    except OSError:
        return f"{pid}: (gone)"


def descendants(pid: int) -> set[int]:
    procs = reaper.snapshot()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p.pid for p in procs.values() if p.ppid in frontier} - found
        found |= frontier
    return found


def kill_9(settings: Settings, name: str, health: str | None = None, timeout: float = 60) -> dict:
    """kill -9 a program's main process; wait until supervisord has it RUNNING again (and healthy).

    Returns the old and new pids, the old process's descendants still alive afterwards, and the
    seconds until the program was back.
    """
    old = program_pid(settings, name)
    children = descendants(old)
    started = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def back():
        info = supervisor.rpc(settings).getProcessInfo(name)
        if info["statename"] != "RUNNING" or info["pid"] in (0, old):
            return False
        if health:
            try:
                return httpx.get(health, timeout=2).status_code < 300
            except httpx.HTTPError:
                return False
        return True

    wait_until(back, timeout, f"{name} back after kill -9", interval=0.2)
    recovered = time.monotonic() - started
    time.sleep(1)  # the reaper's listener acts on the exit event
    survivors = [pid for pid in children if (p := reaper._read(pid)) is not None and not p.zombie]
    return {"old": old, "new": program_pid(settings, name), "survivors": survivors, "seconds": recovered}


def processes_of(state: Path) -> list[str]:
    """Every live process started for this state folder (found through its environment)."""
    marker = f"FLYWHEEL_STATE_DIR={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command[:120]}")
        except OSError:
            continue
    return found


def print_logs(settings: Settings, lines: int = 40) -> None:
    for log in sorted(settings.logs.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"\n===== {log.relative_to(settings.logs)} (last {len(text)} lines) =====")
        print("\n".join(line[:400] for line in text))


def airflow(settings: Settings) -> AirflowAPI:
    return AirflowAPI.connect(settings)


# --- runs and pipelines ---------------------------------------------------------------------------


def finished_run(api: AirflowAPI, dag_id: str, after: set[str], timeout: float = DEADLINE) -> dict:
    """The first run of `dag_id` not in `after`, once it has finished."""

    def done():
        new = [r for r in api.dag_runs(dag_id) if r["dag_run_id"] not in after]
        return new and new[-1]["state"] in ("failed", "success") and new[-1]

    return wait_until(done, timeout, f"a new {dag_id} run finished")


def task_states(api: AirflowAPI, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
    """Each task's state and try number in a run, as Airflow reports them."""
    return {t["task_id"]: (t["state"], t["try_number"]) for t in api.task_instances(dag_id, run_id)}


@contextlib.contextmanager
def extra_pipeline(settings: Settings, name: str, base: str = "iris", edit=lambda text: text):
    """A pipeline file copied from `base` under a new name (and `edit`ed), for as long as the test runs:
    Airflow has parsed its DAGs when this yields; afterwards its file is gone and nothing serves it."""
    from flywheel.serving import rollout

    path = settings.pipelines_dir / f"{name}.yaml"
    text = edit((settings.pipelines_dir / f"{base}.yaml").read_text().replace(f"name: {base}", f"name: {name}"))
    path.write_text(text)
    try:
        with airflow(settings) as api:
            wait_until(lambda: _parsed(api, f"train_{name}"), 180, f"train_{name} parsed by Airflow", interval=3)
        yield name
    finally:
        path.unlink(missing_ok=True)
        rollout.retire(settings, name)


def _parsed(api: AirflowAPI, dag_id: str) -> bool:
    try:
        api.get(f"/dags/{dag_id}")
        return True
    except Exception:
        return False


def ledger(settings: Settings, pipeline: str = "iris") -> dict[str, dict]:
    """Every upload accounted for in MLflow, by version id: its role and the run that recorded it."""
    found = {}
    with MlflowAPI.connect(settings) as mlflow:
        for run in mlflow.search_runs(pipeline, schema.has_tag(schema.LEDGER), max_results=1000):
            entries = json.loads(mlflow.run_artifact(run["info"]["run_id"], schema.LEDGER_ARTIFACT))
            for entry in entries:
                found[entry["version_id"]] = {**entry, "run": run["info"]["run_id"]}
    return found
