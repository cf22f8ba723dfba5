"""The `flywheel` command: run the embedded stack and talk to it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from flywheel.clients import inference
from flywheel.clients.airflow_rest import AirflowAPI, AirflowRejected
from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines, schema
from flywheel.core.settings import AIRFLOW_CLI, Settings
from flywheel.core.upload import Upload
from flywheel.core.waiting import WaitTimeout, wait_until
from flywheel.operations import alerts, lineage, metrics, monitoring, retention, status, timings
from flywheel.operations.parked import DEAD_LETTERS, HELD
from flywheel.operations.rollback import RollbackImpossible, rollback
from flywheel.orchestration import bridge
from flywheel.platform import stack
from flywheel.serving import live, rollout
from flywheel.training import samples


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


def monitoring_lines(settings: Settings, p: pipelines.Pipeline, verdict: dict | None) -> list[str]:
    """The drift monitor's last window, the retraining it started, and the feedback of the last ten minutes."""
    if not p.monitor.enabled:
        return ["  drift         not watched (monitor: false)"]
    lines = []
    if verdict:
        checked = time.strftime("%H:%M:%S", time.gmtime(verdict.get("recorded", 0)))
        state = "DRIFT" if verdict.get("detected") else ("ok" if verdict.get("decided") else "undecided")
        lines.append(
            f"  drift         {state} on v{verdict.get('version') or '-'} at {checked}: {verdict.get('reason', '')}"
        )
    else:
        lines.append(f"  drift         not checked yet (every {p.monitor.every_minutes:g} min)")
    if retraining := monitoring.load(settings, p.name):
        lines.append(f"  retrained     on drift, {retraining.dataset}: {retraining.outcome or 'training'}")
    try:
        live_figures = inference.live(settings, p.name, time.time() - 600)
    except httpx.HTTPError:
        return lines
    for version, roles in sorted(live_figures["versions"].items()):
        for role, f in roles.items():
            score = f"{p.metric} {f['score']:.3f}" if f.get("score") is not None else "no score yet"
            counts = f"{f['labelled']} of {f['answers']} answers labelled"
            lines.append(f"  feedback      v{version} {role}: {counts}, {score} (last 10 min)")
    return lines


def cmd_status(settings: Settings, args) -> int:
    rows = stack.status(settings)
    if not rows:
        _say("not running (start it with `flywheel up`)")
        return 1
    print(f"{'process':<24} {'state':<9} {'pid':>7}  {'healthy':<8} endpoint")
    for r in rows:
        healthy = {True: "yes", False: "NO", None: "-"}[r["healthy"]]
        print(f"{r['name']:<24} {r['state']:<9} {r['pid']:>7}  {healthy:<8} {r['endpoint'] or ''}")
    stats = metrics.by_pipeline(settings)
    try:
        verdicts = inference.drift(settings)
    except httpx.HTTPError:
        verdicts = {}
    with MlflowAPI.connect(settings) as mlflow, AirflowAPI.connect(settings, AIRFLOW_CLI) as airflow:
        for p in pipelines.load_all(settings.pipelines_dir)[0]:
            print()
            try:
                print(status.render(status.pipeline_status(settings, p, mlflow, airflow)))
            except Exception as exc:  # one pipeline's trouble does not hide the others
                print(f"{p.name}: could not read its state: {exc}")
            if state := live.load(settings, p.name):
                ended = state.summary if state.status == live.RUNNING else f"{state.status}: {state.reason}"
                print(f"  rollout       v{state.version} against v{state.baseline or '-'}: {ended}")
            m = stats.get(p.name, {})
            print(
                f"  traffic       {_fmt(m.get('rps'), '.1f')} req/s, errors {_fmt(m.get('error_rate'), '.1%')}, "
                f"p99 {_fmt(m.get('p99_ms'), '.1f')} ms"
            )
            for line in monitoring_lines(settings, p, verdicts.get(p.name)):
                print(line)
    loaded, broken = pipelines.load_all(settings.pipelines_dir)
    known = {p.name for p in loaded}
    held = HELD.read_all(settings)
    for name, error in broken.items():
        waiting = [h for h in held if h["upload"].get("pipeline") == name]
        print(f"\n{name}: BROKEN, its pipeline file does not load; {len(waiting)} upload(s) held until it does")
        print(f"  {error}")
    done = {r["store"]: r for r in retention.reports(settings)}
    print("\nretention (flywheel_retention, hourly; FLYWHEEL_RETENTION_* in .env)")
    for store, policy in retention.policies(settings.retention).items():
        last = done.get(store)
        figures = {k: v for k, v in (last or {}).items() if k not in ("store", "policy", "ran_at")}
        when = f"last {last['ran_at'][:19]}: {figures}" if last else "not run yet" if store != "prometheus" else ""
        print(f"  {store:<11} {policy}" + (f"\n              {when}" if when else ""))
    unowned = [d for d in DEAD_LETTERS.read_all(settings) if d["upload"].get("pipeline") not in known]
    print(f"\ndead-lettered uploads outside any pipeline: {len(unowned)} (`flywheel deadletter list`)")
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
    params = json.loads(args.params) if args.params else {}  # Airflow checks its type against the DAG's params
    for pair in args.param or []:
        name, _, value = pair.partition("=")
        params[name] = _value(value)
    conf = {"dataset": args.dataset or "", "params": params, "note": args.note or ""}
    with AirflowAPI.connect(settings, AIRFLOW_CLI) as api:
        try:
            run = api.trigger(f"train_{args.pipeline}", conf)
        except AirflowRejected as exc:
            _say(f"error: Airflow refused the run: {exc}")
            return 1
        run_id = run["dag_run_id"]
        _say(f"train_{args.pipeline} {run_id} triggered with {conf}")
        if not args.wait:
            return 0

        def finished() -> str | None:
            state = api.get(f"/dags/train_{args.pipeline}/dagRuns/{run_id}")["state"]
            return state if state in ("success", "failed") else None

        try:
            state = wait_until(finished, 900, f"train_{args.pipeline} {run_id} finished", interval=2)
        except WaitTimeout as exc:
            _say(f"{exc}: see {settings.airflow_url}/dags/train_{args.pipeline}")
            return 1
        failed = [t for t in api.task_instances(f"train_{args.pipeline}", run_id) if t["state"] == "failed"]
    with MlflowAPI.connect(settings) as mlflow:
        runs = mlflow.search_runs(args.pipeline, schema.tag_filter(schema.AIRFLOW_RUN, run_id))
    for r in runs:
        record = schema.RunRecord.from_tags(r["data"]["tags"])
        if record.outcome:
            version = f" v{record.model_version}" if record.model_version else ""
            _say(f"{record.outcome}{version}: {record.reason}")
    if failed:
        names = ", ".join(t["task_id"] for t in failed)
        reasons = [a["summary"] for a in alerts.recent(settings) if a["labels"].get("run_id") == run_id]
        _say(f"{state}: {names} failed: {reasons[0] if reasons else f'see its log at {settings.airflow_url}'}")
    return 0 if state == "success" else 1


def cmd_lineage(settings: Settings, args) -> int:
    try:
        if args.request_id:
            request = lineage.find_request(settings, args.request_id)
            chain = {**lineage.chain(settings, request["pipeline"], request["version"]), "request": request}
        else:
            if not args.pipeline:
                _say("error: name a pipeline, or --request-id")
                return 2
            if args.timings:
                waterfall = timings.waterfall(settings, args.pipeline, args.version)
                print(json.dumps(waterfall, indent=1) if args.json else timings.render(waterfall))
                return 0
            chain = lineage.chain(settings, args.pipeline, args.version)
    except lineage.LineageError as exc:
        _say(f"error: {exc}")
        return 1
    print(json.dumps(chain, indent=1) if args.json else lineage.render(chain))
    return 0


def cmd_rollback(settings: Settings, args) -> int:
    try:
        extra = rollback(settings, pipelines.get(settings.pipelines_dir, args.pipeline))
    except RollbackImpossible as exc:
        _say(f"error: {exc}")
        return 1
    _say(
        f"{args.pipeline}: production is v{extra['version']} again ({extra['reason']}); deploy_{args.pipeline} "
        "rolls it out now"
    )
    if args.wait:
        row = json.loads(args.wait)
        with Client(settings) as client:
            version = client.wait_for_version(args.pipeline, row, str(extra["rollback_from"]), progress=_say)
        _say(f"v{version} serving")
    return 0


def cmd_rollout(settings: Settings, args) -> int:
    """A live rollout: where it stands, the figures per arm, and what the judge waits for; or a decision by hand."""
    spec = pipelines.get(settings.pipelines_dir, args.pipeline)
    if args.promote or args.abort:
        try:
            state = live.request(settings, args.pipeline, "promote" if args.promote else "abort")
        except ValueError as exc:
            _say(f"error: {exc}")
            return 1
        decided = "promoted" if args.promote else "rolled back"
        _say(f"{args.pipeline}: v{state.version} will be {decided} at the judge's next look")
        return 0
    state = live.load(settings, args.pipeline)
    if state is None:
        _say(f"{args.pipeline}: no live rollout yet (rollout.strategy: {spec.rollout.strategy})")
        return 0
    print(f"{args.pipeline}: v{state.version} against production v{state.baseline or '-'} ({state.strategy})")
    if state.status != live.RUNNING:
        print(f"  ended         {state.status}: {state.reason}")
        return 0
    print(f"  now           {state.summary}, for {time.time() - state.step_started_at:.0f} s")
    fig = live.figures(settings, spec, state)
    for role, arm in fig["arms"].items():
        score = arm["live"].get("score")
        print(
            f"  {role:<13} v{arm['version']}: {arm.get('requests', 0)} requests, "
            f"errors {_fmt(arm.get('error_ratio'), '.1%')}, p99 {_fmt(arm.get('p99_ms'), '.1f')} ms, "
            f"live {spec.metric} {_fmt(score, '.3f')} "
            f"on {arm['live'].get('rows', 0)} labelled rows"
        )
    if state.phase == "shadow":
        s = fig["shadow"]
        print(
            f"  shadow        {s['requests']} mirrored requests compared, disagreement {_fmt(s['disagreement'], '.1%')}"
        )
    failed = live.guardrails(spec, spec.rollout, fig, state.phase)
    ready, waiting_for = live.step_done(spec.rollout, state, fig, time.time())
    nxt = f"abort: {'; '.join(failed)}" if failed else "next step" if ready else f"waiting: {waiting_for}"
    print(f"  next decision {nxt}")
    return 0


def cmd_retire(settings: Settings, args) -> int:
    live = rollout.retire(settings, args.pipeline)
    what = f"stopped v{live.version} ({live.group})" if live else "nothing was serving it"
    _say(f"{args.pipeline}: {what}; its route goes once its pipeline file is gone too")
    return 0


def cmd_deadletter(settings: Settings, args) -> int:
    """Dead letters are uploads the user wants back once the cause is fixed: list, replay or drop them."""
    letters = DEAD_LETTERS.read_all(settings)
    if args.action == "list":
        for letter in letters:
            print(f"{letter['id']}  {letter['upload'].get('key', '?')}  {letter['reason']}")
        _say(f"{len(letters)} dead letter(s)")
        return 0
    chosen = letters if args.all else [d for d in letters if d["id"] in args.ids]
    missing = set(args.ids) - {d["id"] for d in chosen}
    if missing or not chosen:
        _say(f"error: no dead letter {', '.join(sorted(missing)) or '(name some ids, or --all)'}")
        return 1
    failed = 0
    for letter in chosen:
        upload = Upload.from_dict(letter["upload"])
        if args.action == "replay":
            try:
                with AirflowAPI.connect(settings, AIRFLOW_CLI) as airflow:
                    event = bridge.emit(airflow, pipelines.get(settings.pipelines_dir, upload.pipeline), upload)
            except (pipelines.PipelineError, bridge.NotParsedYet, AirflowRejected) as exc:
                _say(f"{letter['id']}: kept, {exc}")
                failed += 1
                continue
            _say(f"{letter['id']}: {upload.key} replayed as asset event {event['asset_event_id']}")
        DEAD_LETTERS.remove(settings, letter["id"])
        if args.action == "drop":
            _say(f"{letter['id']}: {upload.key} dropped")
    return 1 if failed else 0


def cmd_upload(settings: Settings, args) -> int:
    with Client(settings) as client:
        print(json.dumps(client.upload(args.file, args.pipeline, args.key)))
    return 0


def cmd_predict(settings: Settings, args) -> int:
    with Client(settings) as client:
        r = client.predict(json.loads(args.rows), args.pipeline)
    print(r.text.strip())
    return 0 if r.status_code == 200 else 1


def cmd_demo(settings: Settings, args) -> int:
    cmd_up(settings, args, show_urls=False)
    pipeline = "iris"
    row = [5.1, 3.5, 1.4, 0.2]
    with Client(settings) as client:
        before = client.served_version(pipeline, row)
        sample = samples.make(settings, pipeline, settings.state / "samples" / "iris.csv", seed=int(time.time()))
        key = f"iris-{time.strftime('%Y%m%dT%H%M%S')}.csv"
        uploaded = client.upload(sample, pipeline, key)
        _say(f"uploaded {sample.name} to s3://{uploaded['bucket']}/{uploaded['key']} (etag {uploaded['etag']})")
        _say("waiting for MinIO -> bridge -> Airflow -> MLflow -> BentoML -> Nginx ...")
        started = time.monotonic()
        version = client.wait_for_version(pipeline, row, before, progress=_say)
        _say(f"v{version} serving {time.monotonic() - started:.1f}s after the upload")
        print(client.predict([row]).text.strip())
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
    p.add_argument("--timings", action="store_true", help="the waterfall: each hop from upload to first answer")
    p.set_defaults(func=cmd_lineage)
    p = sub.add_parser("rollout", help="a live rollout: step, traffic, figures per arm; or decide it by hand")
    p.add_argument("pipeline")
    decide = p.add_mutually_exclusive_group()
    decide.add_argument("--promote", action="store_true", help="the candidate takes all traffic now")
    decide.add_argument("--abort", action="store_true", help="all traffic back to production now")
    p.set_defaults(func=cmd_rollout)
    p = sub.add_parser("retire", help="stop serving a pipeline (its route goes once its file is removed)")
    p.add_argument("pipeline")
    p.set_defaults(func=cmd_retire)
    p = sub.add_parser("deadletter", help="uploads the bridge could not hand to Airflow: list, replay, drop")
    p.add_argument("action", choices=["list", "replay", "drop"])
    p.add_argument("ids", nargs="*", help="dead letter ids (from `list`)")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=cmd_deadletter)
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
    except (stack.StackError, TimeoutError) as exc:  # WaitTimeout is a TimeoutError
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
