"""The `flywheel` command: run the embedded stack and talk to it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flywheel import stack
from flywheel.settings import Settings


def _say(message: str) -> None:
    print(f"[flywheel] {message}", flush=True)


def cmd_up(settings: Settings, args, show_urls: bool = True) -> int:
    started = time.monotonic()
    stack.up(settings, progress=_say)
    _say(f"stack up in {time.monotonic() - started:.1f}s")
    if show_urls:
        print_urls(settings)
    return 0


def cmd_down(settings: Settings, args) -> int:
    _say("stopped every process" if stack.down(settings) else "nothing was running")
    return 0


def cmd_status(settings: Settings, args) -> int:
    rows = stack.status(settings)
    if not rows:
        _say("not running (start it with `flywheel up`)")
        return 1
    print(f"{'process':<24} {'state':<9} {'pid':>7}  {'healthy':<8} endpoint")
    for r in rows:
        healthy = {True: "yes", False: "NO", None: "-"}[r["healthy"]]
        print(f"{r['name']:<24} {r['state']:<9} {r['pid']:>7}  {healthy:<8} {r['endpoint'] or ''}")
    from flywheel import deploy, pipelines, serving_metrics

    stats = serving_metrics.by_pipeline(settings)
    print(f"\n{'pipeline':<10} {'serving':<28} {'req/s':>8} {'errors':>8} {'p99 ms':>8}")
    for p in pipelines.load_all(settings.pipelines_dir)[0]:
        d = deploy.current(settings, p.name)
        served = f"v{d.version} ({d.colour})" if d else "nothing deployed yet"
        m = stats.get(p.name, {})
        print(
            f"{p.name:<10} {served:<28} {_fmt(m.get('rps'), '.1f'):>8} {_fmt(m.get('error_rate'), '.1%'):>8} "
            f"{_fmt(m.get('p99_ms'), '.1f'):>8}"
        )
    from flywheel import deadletter

    letters = deadletter.read_all(settings)
    print(f"\ndead-lettered uploads: {len(letters)}" + (f" (in {deadletter.folder(settings)})" if letters else ""))
    for letter in letters[-5:]:
        print(f"  {letter['received_at'][:19]}  {letter['upload'].get('key', '?')}: {letter['reason']}")
    return 0 if all(r["state"] == "RUNNING" and r["healthy"] is not False for r in rows) else 1


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_rollback(settings: Settings, args) -> int:
    from flywheel import deploy, pipelines

    try:
        extra = deploy.rollback(settings, pipelines.get(settings.pipelines_dir, args.pipeline))
    except deploy.RollbackImpossible as exc:
        _say(f"error: {exc}")
        return 1
    _say(
        f"{args.pipeline}: production is v{extra['version']} again ({extra['reason']}); deploy_{args.pipeline} "
        "rolls it out now"
    )
    if args.wait:
        row = json.loads(args.wait)
        version = wait_for_new_version(settings, args.pipeline, row, str(extra["rollback_from"]))
        _say(f"v{version} serving")
    return 0


def cmd_retire(settings: Settings, args) -> int:
    from flywheel import deploy

    live = deploy.retire(settings, args.pipeline)
    what = f"stopped v{live.version} ({live.group})" if live else "nothing was serving it"
    _say(f"{args.pipeline}: {what}; its route goes once its pipeline file is gone too")
    return 0


def upload(settings: Settings, path: Path, pipeline: str, key: str | None = None) -> dict:
    """Upload a file as datasets/<pipeline>/<key>; a folder (an IDX set) goes up as datasets/<pipeline>/<key>/
    file by file, its `_SUCCESS` marker last, so the set's run starts once the set is whole."""
    from flywheel.data import minio_client
    from flywheel.pipelines import READY_MARKER

    client = minio_client(settings, root=True)  # the operator's upload, not the platform's identity
    key = f"{pipeline}/{key or path.name}"
    if path.is_dir():
        files = sorted(path.iterdir(), key=lambda f: (f.name == READY_MARKER, f.name))
        return {
            "set": key,
            "objects": [upload(settings, f, pipeline, f"{key.split('/', 1)[1]}/{f.name}") for f in files],
        }
    result = client.fput_object(settings.datasets_bucket, key, str(path))
    return {"bucket": settings.datasets_bucket, "key": key, "etag": result.etag, "version_id": result.version_id}


def cmd_upload(settings: Settings, args) -> int:
    print(json.dumps(upload(settings, args.file, args.pipeline, args.key)))
    return 0


def predict(settings: Settings, rows: list, pipeline: str | None = None) -> httpx.Response:
    path = f"/{pipeline}/predict" if pipeline else "/predict"
    return httpx.post(f"{settings.predict_url}{path}", json={"inputs": rows}, timeout=30)


def cmd_predict(settings: Settings, args) -> int:
    r = predict(settings, json.loads(args.rows), args.pipeline)
    print(r.text.strip())
    return 0 if r.status_code == 200 else 1


def served_version(settings: Settings, pipeline: str, row: list) -> str | None:
    try:
        r = predict(settings, [row], pipeline)
    except httpx.HTTPError:
        return None
    return r.json()["model"]["version"] if r.status_code == 200 else None


def wait_for_new_version(
    settings: Settings, pipeline: str, row: list, before: str | None, timeout: float = 600, progress=_say
) -> str:
    """Poll /predict (and show the DAG runs' progress) until a version other than `before` answers."""
    from flywheel.airflow_api import AirflowAPI

    api = AirflowAPI.connect(settings)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for dag_id in (f"train_{pipeline}", f"deploy_{pipeline}"):
            try:
                runs = api.dag_runs(dag_id, limit=1)
            except Exception:
                runs = []
            for run in runs:
                if seen.get(run["dag_run_id"]) != run["state"]:
                    seen[run["dag_run_id"]] = run["state"]
                    progress(f"  {dag_id:<16} {run['dag_run_id']}: {run['state']}")
        version = served_version(settings, pipeline, row)
        if version is not None and version != before:
            return version
        time.sleep(1)
    raise TimeoutError(
        f"no new {pipeline} version served within {timeout:.0f}s (still {before}); "
        f"see the DAG runs at {settings.airflow_url}"
    )


def make_sample(settings: Settings, name: str, output: Path, seed: int | None = None) -> Path:
    command = [str(settings.venv_ml / "bin" / "python"), "-m", "flywheel.samples", name, str(output)]
    if seed is not None:
        command += ["--seed", str(seed)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return output


def cmd_demo(settings: Settings, args) -> int:
    cmd_up(settings, args, show_urls=False)
    pipeline = "iris"
    row = [5.1, 3.5, 1.4, 0.2]
    before = served_version(settings, pipeline, row)
    sample = make_sample(settings, pipeline, settings.state / "samples" / "iris.csv", seed=int(time.time()))
    key = f"iris-{time.strftime('%Y%m%dT%H%M%S')}.csv"
    uploaded = upload(settings, sample, pipeline, key)
    _say(f"uploaded {sample.name} to s3://{uploaded['bucket']}/{uploaded['key']} (etag {uploaded['etag']})")
    _say("waiting for MinIO -> bridge -> Airflow -> MLflow -> BentoML -> Nginx ...")
    started = time.monotonic()
    version = wait_for_new_version(settings, pipeline, row, before)
    _say(f"v{version} serving {time.monotonic() - started:.1f}s after the upload")
    r = predict(settings, [row])
    print(r.text.strip())
    print_urls(settings)
    _say("the stack keeps running: `make down` stops it")
    return 0


def print_urls(settings: Settings) -> None:
    s = settings
    p = s.ports
    print(
        f"""
  Predict     curl -s -X POST {s.predict_url}/predict -H 'content-type: application/json' \\
                   -d '{{"inputs": [[5.1, 3.5, 1.4, 0.2]]}}'
  MinIO       {s.url(p.minio_console)}   (user/password: MINIO_ROOT_USER / MINIO_ROOT_PASSWORD in {s.repo / ".env"})
  Airflow     {s.airflow_url}   (user admin, password: AIRFLOW_ADMIN_PASSWORD in .env)
  MLflow      {s.mlflow_url}   (user admin, password: MLFLOW_AUTH_ADMIN_PASSWORD in .env)
  Prometheus  {s.prometheus_url}
  Logs        {s.logs}/
""",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description="Event-driven train-to-serve, on one machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start every service under supervisord and wait until healthy").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop every process").set_defaults(func=cmd_down)
    sub.add_parser("status", help="health of every process and what each pipeline serves").set_defaults(func=cmd_status)
    sub.add_parser("demo", help="up, upload iris, wait until the new model serves").set_defaults(func=cmd_demo)
    p = sub.add_parser("upload", help="upload a dataset file: it triggers retraining")
    p.add_argument("file", type=Path)
    p.add_argument("--pipeline", default="iris")
    p.add_argument("--key", help="object name under datasets/<pipeline>/ (default: the file's name)")
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("rollback", help="put the `previous` model version back into production and serve it")
    p.add_argument("pipeline")
    p.add_argument(
        "--wait", metavar="ROW", help="wait until a prediction for this JSON row names the rolled-back version"
    )
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("retire", help="stop serving a pipeline (its route goes once its file is removed)")
    p.add_argument("pipeline")
    p.set_defaults(func=cmd_retire)
    p = sub.add_parser("predict", help="POST rows to /predict through Nginx")
    p.add_argument("rows", help='JSON list of rows, e.g. "[[5.1, 3.5, 1.4, 0.2]]"')
    p.add_argument("--pipeline", help="default: the default pipeline at /predict")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(create_secrets=args.command in ("up", "demo"))
    try:
        return args.func(settings, args)
    except (stack.StackError, TimeoutError) as exc:
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
