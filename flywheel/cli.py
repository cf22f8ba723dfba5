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
    from flywheel import overview, pipelines, serving_metrics
    from flywheel.airflow_api import AirflowAPI
    from flywheel.mlflow_api import MlflowAPI

    stats = serving_metrics.by_pipeline(settings)
    with MlflowAPI.connect(settings) as mlflow, AirflowAPI.connect(settings) as airflow:
        for p in pipelines.load_all(settings.pipelines_dir)[0]:
            print()
            try:
                print(overview.render(overview.pipeline_status(settings, p, mlflow, airflow)))
            except Exception as exc:  # one pipeline's trouble does not hide the others
                print(f"{p.name}: could not read its state: {exc}")
            m = stats.get(p.name, {})
            print(
                f"  traffic       {_fmt(m.get('rps'), '.1f')} req/s, errors {_fmt(m.get('error_rate'), '.1%')}, "
                f"p99 {_fmt(m.get('p99_ms'), '.1f')} ms"
            )
    from flywheel import deadletter

    known = {p.name for p in pipelines.load_all(settings.pipelines_dir)[0]}
    unowned = [d for d in deadletter.read_all(settings) if d["upload"].get("pipeline") not in known]
    print(f"\ndead-lettered uploads outside any pipeline: {len(unowned)}")
    for letter in unowned[-5:]:
        print(f"  {letter['received_at'][:19]}  {letter['upload'].get('key', '?')}: {letter['reason']}")
    return 0 if all(r["state"] == "RUNNING" and r["healthy"] is not False for r in rows) else 1


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _value(text: str):
    """A --param value: JSON where it parses (numbers), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_train(settings: Settings, args) -> int:
    """Trigger train_<p> by hand: the same validation and gate, with the chosen data and parameters."""
    from flywheel.airflow_api import AirflowAPI, AirflowRejected
    from flywheel.mlflow_api import MlflowAPI

    params = json.loads(args.params) if args.params else {}  # Airflow checks its type against the DAG's params
    for pair in args.param or []:
        name, _, value = pair.partition("=")
        params[name] = _value(value)
    conf = {"dataset": args.dataset or "", "params": params, "note": args.note or ""}
    with AirflowAPI.connect(settings) as api:
        try:
            run = api.trigger(f"train_{args.pipeline}", conf)
        except AirflowRejected as exc:
            _say(f"error: Airflow refused the run: {exc}")
            return 1
        run_id = run["dag_run_id"]
        _say(f"train_{args.pipeline} {run_id} triggered with {conf}")
        if not args.wait:
            return 0
        deadline = time.monotonic() + 900
        while (state := api.get(f"/dags/train_{args.pipeline}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
            if time.monotonic() > deadline:
                _say(f"still {state} after 900 s: see {settings.airflow_url}/dags/train_{args.pipeline}")
                return 1
            time.sleep(2)
        failed = [t for t in api.task_instances(f"train_{args.pipeline}", run_id) if t["state"] == "failed"]
    with MlflowAPI.connect(settings) as mlflow:
        runs = mlflow.search_runs(args.pipeline, f"tags.`airflow.run_id` = '{run_id}'")
    for r in runs:
        tags = r["data"]["tags"]
        if tags.get("flywheel.decision") or tags.get("flywheel.status"):
            version = f" v{tags['flywheel.model_version']}" if tags.get("flywheel.model_version") else ""
            verdict = tags.get("flywheel.decision") or tags.get("flywheel.status")
            _say(f"{verdict}{version}: {tags.get('flywheel.reason', '')}")
    if failed:
        from flywheel import alerts

        names = ", ".join(t["task_id"] for t in failed)
        reasons = [a["summary"] for a in alerts.recent(settings) if a["labels"].get("run_id") == run_id]
        _say(f"{state}: {names} failed: {reasons[0] if reasons else f'see its log at {settings.airflow_url}'}")
    return 0 if state == "success" else 1


def cmd_lineage(settings: Settings, args) -> int:
    from flywheel import lineage

    try:
        if args.request_id:
            request = lineage.find_request(settings, args.request_id)
            chain = {**lineage.chain(settings, request["pipeline"], request["version"]), "request": request}
        else:
            if not args.pipeline:
                _say("error: name a pipeline, or --request-id")
                return 2
            chain = lineage.chain(settings, args.pipeline, args.version)
    except lineage.LineageError as exc:
        _say(f"error: {exc}")
        return 1
    print(json.dumps(chain, indent=1) if args.json else lineage.render(chain))
    return 0


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
    p = sub.add_parser("train", help="retrain a pipeline by hand: chosen data, parameter overrides, a note")
    p.add_argument("pipeline")
    p.add_argument("--dataset", help="key or version id under datasets/<pipeline>/ (default: the newest upload)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a parameter override (repeatable)")
    p.add_argument("--params", help="parameter overrides as a JSON object")
    p.add_argument("--note", help="why this run; recorded on it")
    p.add_argument("--wait", action="store_true", help="wait for the run and print the gate's decision")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("lineage", help="upload -> event -> run -> MLflow -> version -> Bento -> deployment")
    p.add_argument("pipeline", nargs="?")
    p.add_argument("--version", help="a registered version (default: production)")
    p.add_argument("--request-id", help="start from an answer's X-Request-Id")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_lineage)
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
