"""Compose mode end to end: an upload to MinIO is trained, built, switched and served, all in containers.

The stack is docker-compose.yml itself (conftest.py); the test talks to it only through the ports it
publishes on 127.0.0.1 and through `docker compose exec`. Tests run in order and build on each other:
one upload served, Prometheus and Airflow checked, a second upload served through a blue/green
switch; then features combined and the promises under load (loopback ports, no secret in `serving`,
API keys, a burst of uploads, kill -9 of a replica under load, a rejection's alert at a webhook
container), steps in containers (FLYWHEEL_RUNNER=docker), and the `celery` profile's worker.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.clients import load as loadgen
from flywheel.clients import prometheus
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.core import schema
from flywheel.core.settings import GENERATED_SECRETS, REPO_ROOT, Settings, read_env_file
from tests.compose.conftest import WEBHOOK_PORT, Compose, figure
from tests.e2e.stack_ops import IRIS_COLUMNS, TRAINING, _parsed, csv_bytes, ledger, wait_until

PIPELINE = "iris"
ROW = [5.1, 3.5, 1.4, 0.2]
DEADLINE = 900  # seconds from an upload to its version served: a cold 2-core machine
STATE = "/var/lib/flywheel"
SUPERVISORD_CONF = "/tmp/supervisord.conf"  # services/serving/supervise.py


def iris_upload(i: int) -> bytes:
    """A valid iris table, different for each i (rows rotated): every upload a new object version."""
    k = i % len(TRAINING)
    return csv_bytes(TRAINING[k:] + TRAINING[:k])


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory) -> bytes:
    """The iris CSV the docs upload (`python -m flywheel.training.samples iris`), written by the ML venv."""
    path = tmp_path_factory.mktemp("iris") / "iris.csv"
    python = REPO_ROOT / ".venv" / "ml" / "bin" / "python"
    subprocess.run([str(python), "-m", "flywheel.training.samples", "iris", str(path)], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def airflow(settings):
    with AirflowAPI.connect(settings) as api:
        yield api


def upload(settings: Settings, key: str, body: bytes) -> dict:
    """Through MinIO's published port, as any S3 client would."""
    import io

    # As a person uploads: MinIO's root user (the platform's own identity may only read datasets).
    result = minio_client(settings, root=True).put_object(
        "datasets", key, io.BytesIO(body), len(body), content_type="text/csv"
    )
    return {"key": key, "etag": result.etag, "version_id": result.version_id, "at": time.monotonic()}


def predict(settings: Settings, path: str = "/predict", key: str | None = None) -> httpx.Response:
    """With this run's API key (run.sh turns keys on), unless the test names another ("" for none)."""
    key = settings.client_api_key if key is None else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{settings.predict_url}{path}", json={"inputs": [ROW]}, headers=headers, timeout=30)


def wait_served(settings: Settings, newer_than: int, uploaded: dict) -> dict:
    """The answer through the compose Nginx once it names a version above `newer_than`."""
    deadline = time.monotonic() + DEADLINE
    last = ""
    while time.monotonic() < deadline:
        try:
            r = predict(settings)
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code == 200 and int(r.json()["model"]["version"]) > newer_than:
                body = r.json()
                body["seconds"] = time.monotonic() - uploaded["at"]
                return body
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"no version above {newer_than} served within {DEADLINE}s after {uploaded['key']}: {last}")


def deployment(compose: Compose) -> dict:
    """What serves the pipeline, as the deploy step recorded it on the state volume."""
    return json.loads(compose.exec("serving", "cat", f"{STATE}/deployments/{PIPELINE}.json"))


def bento_programs(compose: Compose) -> dict[str, str]:
    """supervisord's Bento programs in `serving`: name -> state."""
    out = compose.exec("serving", "supervisorctl", "-c", SUPERVISORD_CONF, "status", check=False)
    rows = [line.split() for line in out.splitlines() if line.startswith("bento-")]
    return {row[0]: row[1] for row in rows}


def replica_ready(compose: Compose, name: str) -> bool:
    """Whether the Bento program `name` (bento-<p>-<colour>-<i>) answers /readyz in `serving`: its
    port refuses connections until its model is loaded (flywheel/serving/replica.py)."""
    port = deployment(compose)["ports"][int(name.rsplit("-", 1)[1])]
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=2)"
    return compose("exec", "-T", "serving", "python", "-c", probe, check=False).returncode == 0


def task_hostname(airflow: AirflowAPI, dag_id: str, run_id: str, task_id: str) -> str:
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(dag_id, run_id)}
    assert tis[task_id]["state"] == "success", tis[task_id]
    return tis[task_id]["hostname"]


def newest_run(airflow: AirflowAPI, dag_id: str, timeout: float = 300) -> dict:
    """The DAG's newest run, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = airflow.dag_runs(dag_id, limit=1)
        if runs and runs[0]["state"] in ("success", "failed"):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"{dag_id}: no finished run within {timeout}s")


# --- the stack ----------------------------------------------------------------------------------------


def test_every_service_is_healthy_and_grafana_is_left_out(compose):
    rows = [json.loads(line) for line in compose("ps", "--all", "--format", "json").stdout.splitlines() if line]
    states = {row["Service"]: (row["State"], row.get("Health", ""), row.get("ExitCode", 0)) for row in rows}
    for service, (state, health, code) in states.items():
        if service in ("minio-init", "flywheel-init", "mlflow-init"):
            assert (state, code) == ("exited", 0), f"{service}: {state}, exit code {code}"
        else:
            assert (state, health) == ("running", "healthy"), f"{service}: {state} {health}"
    assert "grafana" not in states
    print(
        "grafana: not started. It is in the `grafana` profile because its image cannot be pulled here, and "
        "no stand-in replaces it (tests/compose/standins.py); `docker compose --profile grafana up` starts it."
    )


def test_nothing_is_served_before_the_first_upload(settings):
    r = predict(settings)
    assert r.status_code == 503, r.text


def test_prometheus_sends_to_alertmanager_and_mlflow_wants_a_login(settings):
    r = httpx.get(f"{settings.prometheus_url}/api/v1/alertmanagers", timeout=10)
    active = [a["url"] for a in r.json()["data"]["activeAlertmanagers"]]
    assert any("alertmanager:9093" in url for url in active), active
    r = httpx.get(f"{settings.mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10)
    assert r.status_code == 401, r.status_code


# --- upload -> served ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first(settings, iris_csv) -> dict:
    uploaded = upload(settings, f"{PIPELINE}/first.csv", iris_csv)
    served = wait_served(settings, 0, uploaded)
    figure("first upload -> served (s)", served["seconds"])
    return {**uploaded, "served": served}


def test_an_upload_is_trained_and_served_through_nginx(first):
    body = first["served"]
    assert body["model"]["name"] == PIPELINE
    assert body["dataset"]["etag"] == first["etag"]
    assert body["predictions"] == ["setosa"]


def test_prometheus_scrapes_the_bento_with_its_labels(settings, first):
    version = str(first["served"]["model"]["version"])
    query = f'up{{job="bento", pipeline="{PIPELINE}", model_version="{version}"}}'
    deadline = time.monotonic() + 90
    result = []
    while time.monotonic() < deadline:
        r = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": query}, timeout=10)
        result = r.json()["data"]["result"]
        if result and all(sample["value"][1] == "1" for sample in result):
            break
        time.sleep(3)
    assert result, f"Prometheus has no {query}"
    assert all(sample["value"][1] == "1" for sample in result), result
    # The Bento's own metrics carry the same labels: requests by model version.
    predict(settings)
    query = f'bentoml_service_request_total{{pipeline="{PIPELINE}", model_version="{version}", endpoint="/predict"}}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": query}, timeout=10).json()
        if found["data"]["result"]:
            break
        time.sleep(3)
    assert found["data"]["result"], f"Prometheus has no {query}"


def test_airflow_shows_the_asset_chain(airflow, first):
    """s3://datasets/iris -> train_iris -> model://iris/production -> deploy_iris -> deployment://iris/production"""
    version = str(first["served"]["model"]["version"])
    run = newest_run(airflow, f"deploy_{PIPELINE}")
    assert run["state"] == "success", run
    (dataset,) = [e for e in airflow.asset_events(f"s3://datasets/{PIPELINE}") if e["extra"]["key"] == first["key"]]
    assert f"train_{PIPELINE}" in {r["dag_id"] for r in dataset["created_dagruns"]}
    (model,) = [e for e in airflow.asset_events(f"model://{PIPELINE}/production") if e["extra"]["version"] == version]
    assert model["source_dag_id"] == f"train_{PIPELINE}"
    assert model["extra"]["dataset"]["etag"] == first["etag"]
    assert f"deploy_{PIPELINE}" in {r["dag_id"] for r in model["created_dagruns"]}
    deployments = airflow.asset_events(f"deployment://{PIPELINE}/production")
    (deployed,) = [e for e in deployments if str(e["extra"]["version"]) == version]
    assert deployed["source_dag_id"] == f"deploy_{PIPELINE}"


# --- a new version, through the compose deploy path -----------------------------------------------------


@pytest.fixture(scope="module")
def second(compose, settings, airflow, iris_csv, first) -> dict:
    before = deployment(compose)
    # The same rows under a new key: a new object version, so a new run trains the same model, which
    # ties production on the same holdout, and a tie promotes (pipelines/iris.yaml: margin 0).
    uploaded = upload(settings, f"{PIPELINE}/second.csv", iris_csv)
    served = wait_served(settings, int(first["served"]["model"]["version"]), uploaded)
    figure("second upload -> served, blue/green (s)", served["seconds"])
    # Nginx answers from the new colour before the rollout ends: it then drains and stops the old one.
    run = newest_run(airflow, f"deploy_{PIPELINE}")
    return {**uploaded, "served": served, "before": before, "deploy_run": run}


def test_a_second_upload_is_built_and_switched_blue_green(compose, second):
    version = str(second["served"]["model"]["version"])
    before, after = second["before"], deployment(compose)
    assert after["version"] == version
    assert after["bento_tag"] == f"flywheel-{PIPELINE}:v{version}"
    assert after["colour"] != before["colour"], "the idle colour serves the new version"
    # The Bento was built into the store on the state volume, where `serving` starts it from.
    bentos = compose.exec("serving", "bentoml", "list", "-o", "json")
    assert {before["bento_tag"], after["bento_tag"]} <= {b["tag"] for b in json.loads(bentos)}
    # supervisord in `serving` runs the new colour's replicas only: the old ones were stopped.
    programs = bento_programs(compose)
    new_group, old_group = f"bento-{PIPELINE}-{after['colour']}", f"bento-{PIPELINE}-{before['colour']}"
    assert programs and all(name.startswith(f"{new_group}:") for name in programs), programs
    assert all(state == "RUNNING" for state in programs.values()), programs
    assert not any(name.startswith(old_group) for name in programs)


def test_the_deploy_ran_in_the_scheduler_under_the_local_executor(compose, airflow, second):
    run = second["deploy_run"]
    assert run["state"] == "success", run
    scheduler = compose.container("airflow-scheduler")["Config"]["Hostname"]
    assert task_hostname(airflow, f"deploy_{PIPELINE}", run["dag_run_id"], "rollout") == scheduler
    # Its step, forked by the step-server container through the socket on the state volume.
    assert "[runner] flywheel.serving.build runs warm" in task_log(compose, run, "build")


# --- security by default, in containers -------------------------------------------------------------


def test_every_published_port_is_on_loopback_only(compose):
    published = {}
    for service in compose("ps", "--services").stdout.split():
        for port, bindings in (compose.container(service)["NetworkSettings"]["Ports"] or {}).items():
            for binding in bindings or []:
                published[f"{service} {port}"] = binding["HostIp"]
    assert published, "nothing is published"
    assert {ip for ip in published.values()} == {"127.0.0.1"}, published


def test_serving_holds_no_secret_and_mounts_no_secrets_volume(compose):
    """`serving` runs what answers the world: Nginx and the Bentos get no credential of the stack."""
    values = read_env_file(compose.env_file)
    secrets = {values[name] for name in (*GENERATED_SECRETS, "FLYWHEEL_API_KEYS")}
    serving = compose.container("serving")
    env = dict(item.split("=", 1) for item in serving["Config"]["Env"])
    assert not [name for name, value in env.items() if value in secrets]
    assert not [m for m in serving["Mounts"] if m["Destination"].startswith("/var/lib/flywheel-secrets")]


def test_predict_wants_an_api_key_and_says_so_in_json(settings, first):
    for key in ("", "not-the-key-0123456789abcdef"):
        denied = predict(settings, key=key)
        assert denied.status_code == 401 and "API key" in denied.json()["error"], denied.text
    assert predict(settings).status_code == 200


def test_feedback_reaches_the_inference_container_and_the_log_lands_in_minio(settings, first):
    """An answer's request id, then its label through Nginx's /iris/feedback (API key and all): the
    inference container matched it to what serving spooled, and ships both to s3://inference."""
    key = {"Authorization": f"Bearer {settings.client_api_key}"}
    rid = f"compose-{time.time_ns()}"
    answer = httpx.post(
        f"{settings.predict_url}/iris/predict", json={"inputs": [ROW]}, headers={**key, "X-Request-Id": rid}, timeout=30
    )
    assert answer.status_code == 200 and answer.headers["x-model-role"] == "production", answer.text

    def matched():
        r = httpx.post(
            f"{settings.predict_url}/iris/feedback",
            json={"request_id": rid, "label": "setosa"},
            headers=key,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.json()["items"][0]["matched"] and r.json()

    body = wait_until(matched, 60, "the answer matched by its request id", interval=1)
    assert body["items"][0]["version"] == answer.headers["x-model-version"]
    denied = httpx.post(
        f"{settings.predict_url}/iris/feedback", json={"request_id": rid, "label": "setosa"}, timeout=30
    )
    assert denied.status_code == 401 and "API key" in denied.json()["error"]
    store = minio_client(settings, root=True)
    for kind in ("answers", "feedback"):
        wait_until(
            lambda kind=kind: list(store.list_objects("inference", f"iris/{kind}/", recursive=True)),
            60,
            f"{kind} in s3://inference",
        )


def answer_training_rows(settings: Settings, n: int) -> None:
    """n answers of rows from the training file, with this run's API key: a window for the monitor."""
    key = {"Authorization": f"Bearer {settings.client_api_key}"}
    with httpx.Client(base_url=settings.predict_url, headers=key, timeout=30) as http:
        for i in range(n):
            r = http.post(f"/{PIPELINE}/predict", json={"inputs": [TRAINING[(i * 7) % len(TRAINING)][:4]]})
            assert r.status_code == 200, r.text
    # Past the window's end (now - 15 s) and the inference container's shipping to MinIO (every 10 s).
    time.sleep(30)


def monitor_by_hand(airflow: AirflowAPI) -> dict:
    """A run of monitor_<p> now (its schedule is every 5 minutes), once it has finished."""
    run = airflow.trigger(f"monitor_{PIPELINE}", {})
    path = f"/dags/monitor_{PIPELINE}/dagRuns/{run['dag_run_id']}"
    return wait_until(
        lambda: (r := airflow.get(path))["state"] in ("success", "failed") and r, 300, "the monitor's run", interval=2
    )


def test_the_monitor_reads_the_inference_log_and_prometheus_has_its_verdict(settings, airflow, first):
    """The drift monitor in containers: the window is read back from s3://inference, decided against
    the serving version's training profile, and its figures reach Prometheus through `inference`."""
    answer_training_rows(settings, 150)
    run = monitor_by_hand(airflow)
    assert run["state"] == "success", run
    verdict = wait_until(
        lambda: prometheus.query(settings, f'flywheel_drift_window_rows{{pipeline="{PIPELINE}"}} >= 150'),
        60,
        "the monitor's window in Prometheus",
    )
    version = verdict[0]["metric"]["model_version"]
    scores = prometheus.query(settings, f'flywheel_drift_score{{pipeline="{PIPELINE}"}}')
    assert {s["metric"]["feature"] for s in scores} == {*IRIS_COLUMNS, "prediction"}
    assert {s["metric"]["model_version"] for s in scores} == {version}


# --- the promises under load --------------------------------------------------------------------------


def served_version(settings: Settings) -> int:
    r = predict(settings)
    assert r.status_code == 200, r.text
    return int(r.json()["model"]["version"])


def wait_for_dataset(settings: Settings, uploaded: dict) -> dict:
    """Until the answer comes from a model trained on exactly this upload."""
    deadline = time.monotonic() + DEADLINE
    body = {}
    while time.monotonic() < deadline:
        r = predict(settings)
        body = r.json() if r.status_code == 200 else {}
        if body and body["dataset"]["version_id"] == uploaded["version_id"]:
            return {**body, "seconds": time.monotonic() - uploaded["at"]}
        time.sleep(2)
    raise AssertionError(f"{uploaded['key']} not served within {DEADLINE}s; last answer {body}")


def test_a_burst_of_uploads_ends_with_the_newest_served_and_every_upload_accounted(settings, second):
    n = 8
    with ThreadPoolExecutor(max_workers=n) as pool:
        burst = list(pool.map(lambda i: upload(settings, f"{PIPELINE}/burst/{i:02d}.csv", iris_upload(i)), range(n)))
    newest = upload(settings, f"{PIPELINE}/burst/zz-after.csv", iris_upload(n))
    body = wait_for_dataset(settings, newest)
    figure(f"burst of {n + 1} uploads, the newest served (s)", body["seconds"])
    deadline, found = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        found = ledger(settings, PIPELINE)
        if all(u["version_id"] in found for u in [*burst, newest]):
            break
        time.sleep(5)
    stranded = [u["key"] for u in [*burst, newest] if u["version_id"] not in found]
    assert stranded == [], f"uploads never accounted for: {stranded}"
    assert found[newest["version_id"]]["role"] == "trained"
    assert {found[u["version_id"]]["role"] for u in burst} <= {"trained", "superseded"}


def serving_processes(compose: Compose) -> list[dict]:
    """Every process in `serving`, read from its /proc: pid, parent, command line."""
    script = (
        "import json, os\n"
        "out = []\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip()\n"
        "    except OSError:\n"
        "        continue\n"
        "    out.append({'pid': int(pid), 'ppid': int(stat[1]), 'cmd': cmd})\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(compose.exec("serving", "python", "-c", script))


def orphans_in_serving(compose: Compose) -> list[dict]:
    """What supervisord does not own: reparented to the container's init (PID 1), other than supervisord
    itself; `docker exec`'s own processes have no parent in the container (0) and are not counted."""
    procs = serving_processes(compose)
    return [p for p in procs if p["ppid"] == 1 and "supervisord" not in p["cmd"]]


def settled(airflow: AirflowAPI, timeout: float = 300) -> None:
    """No train or deploy run of the pipeline queued or running: no blue/green switch is on its way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dags = (f"train_{PIPELINE}", f"deploy_{PIPELINE}")
        if not any(airflow.dag_runs(d, limit=5, states=("queued", "running")) for d in dags):
            return
        time.sleep(2)
    raise AssertionError(f"runs of {PIPELINE} still going after {timeout}s")


def test_kill_9_of_a_replica_under_load_in_serving_costs_no_request(compose, settings, airflow):
    settled(airflow)  # the burst's last runs: a switch would rename the replicas under the test
    programs = bento_programs(compose)
    assert len(programs) >= 2 and set(programs.values()) == {"RUNNING"}, programs
    load = loadgen.start(
        f"{settings.predict_url}/{PIPELINE}/predict", {"inputs": [ROW]}, 8, 40, api_key=settings.client_api_key
    )
    recovered = []
    try:
        for k in range(4):
            time.sleep(4)
            names = sorted(n for n, state in bento_programs(compose).items() if state == "RUNNING")
            name = names[k % len(names)]
            pid = compose.exec("serving", "supervisorctl", "-c", SUPERVISORD_CONF, "pid", name).strip()
            killed = time.monotonic()
            compose.exec("serving", "sh", "-c", f"kill -9 {pid}")
            deadline = killed + 60
            while time.monotonic() < deadline:
                now = compose.exec("serving", "supervisorctl", "-c", SUPERVISORD_CONF, "pid", name, check=False).strip()
                if (
                    now.isdigit()
                    and now not in ("0", pid)
                    and bento_programs(compose).get(name) == "RUNNING"
                    and replica_ready(compose, name)  # as in embedded mode's test: back and ready, then the next kill
                ):
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"{name} not back within 60s of kill -9")
            recovered.append(time.monotonic() - killed)
    finally:
        stats = loadgen.finish(load)
    print(f"\n4 replica kills in serving, back in {min(recovered):.1f}-{max(recovered):.1f}s; {stats}")
    figure("kill -9 of a replica under load: failed requests", f"{stats['failed']} of {stats['requests']}")
    assert stats["failed"] == 0, stats
    assert stats["requests"] > 100, stats
    time.sleep(3)  # the reaper's event listener acts on the exit event
    assert orphans_in_serving(compose) == []


LIVE = "iris_live"
CANARY = """
serving: {replicas: 1}
rollout:
  strategy: canary
  steps: [10, 50, 100]
  bake_seconds: 3
  min_requests: 10
  guardrails: {min_feedback: 10}
"""


def test_a_new_pipeline_file_goes_live_through_a_canary_with_no_failed_request(compose, settings, airflow):
    """Features combined in containers: a pipeline file added while the stack runs, API keys, a canary
    judged on the Bentos' metrics in Prometheus and on feedback through the inference container, its
    waits deferred to the triggerer. Every request answered 200, by the arm Nginx named."""
    from tests.e2e.test_live_rollouts import LiveTraffic

    path = REPO_ROOT / "pipelines" / f"{LIVE}.yaml"
    text = (REPO_ROOT / "pipelines" / f"{PIPELINE}.yaml").read_text().replace(f"name: {PIPELINE}", f"name: {LIVE}")
    path.write_text(text + CANARY)
    try:
        wait_until(lambda: _parsed(airflow, f"deploy_{LIVE}"), 300, f"deploy_{LIVE} parsed", interval=3)
        first = upload(settings, f"{LIVE}/v1.csv", iris_upload(3))
        body = wait_until(lambda: _answer(settings, LIVE), DEADLINE, f"{LIVE} v1 served")
        v1 = str(body["model"]["version"])
        figure("a new pipeline's first upload -> served (s)", time.monotonic() - first["at"])
        before = {r["dag_run_id"] for r in airflow.dag_runs(f"deploy_{LIVE}")}
        with LiveTraffic(settings, LIVE) as traffic:
            second = upload(settings, f"{LIVE}/v2.csv", iris_upload(7))
            run = wait_until(
                lambda: next(
                    (
                        r
                        for r in airflow.dag_runs(f"deploy_{LIVE}")
                        if r["dag_run_id"] not in before and r["state"] in ("success", "failed")
                    ),
                    None,
                ),
                DEADLINE,
                f"deploy_{LIVE}'s canary decided",
            )
            figure("upload -> 100 % through a canary (s)", time.monotonic() - second["at"])
            time.sleep(3)
            after = time.time()
            time.sleep(3)
        assert run["state"] == "success", run
        answered = traffic.by()
        print(f"\nanswers by (version, role): {dict(answered)}; labelled {len(traffic.labelled)}")
        v2 = str(int(v1) + 1)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.feedback_errors == [], traffic.feedback_errors[:5]
        assert answered[(v2, "candidate")] > 0 and answered[(v1, "production")] > 0, answered
        assert set(traffic.by(after)) == {(v2, "production")}, answered
        # Between its looks the judge waited on the triggerer, holding no worker slot.
        assert "Pausing task as DEFERRED" in task_log(compose, run, "judge")
        with MlflowAPI.connect(settings) as mlflow:
            tags = mlflow.model_version(LIVE, v2)["tags"]
        assert tags[schema.ROLLOUT].startswith("promoted: every step passed (10%, 50%, 100%)"), tags
    finally:
        path.unlink(missing_ok=True)
        compose.exec("airflow-scheduler", "python", "-m", "flywheel.cli", "retire", LIVE, check=False)


def _answer(settings: Settings, pipeline: str) -> dict | None:
    r = predict(settings, f"/{pipeline}/predict")
    return r.json() if r.status_code == 200 else None


def received_alerts() -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{WEBHOOK_PORT}/received", timeout=10).json()


def train_states(airflow: AirflowAPI, run: dict) -> dict[str, tuple[str, int]]:
    return {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in airflow.task_instances(f"train_{PIPELINE}", run["dag_run_id"])
    }


def run_of(airflow: AirflowAPI, uploaded: dict, before: set[str], timeout: float = 600) -> dict:
    """The finished train run that this upload's asset event triggered (Airflow's own record of it)."""
    dag_id = f"train_{PIPELINE}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in airflow.dag_runs(dag_id):
            if run["dag_run_id"] in before or run["state"] not in ("success", "failed"):
                continue
            events = airflow.get(f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")["asset_events"]
            if any((e.get("extra") or {}).get("version_id") == uploaded["version_id"] for e in events):
                return run
        time.sleep(2)
    raise AssertionError(f"no finished {dag_id} run triggered by {uploaded['key']} within {timeout}s")


def reject_one(settings: Settings, airflow: AirflowAPI, key: str) -> dict:
    """An upload without the target column: rejected by validate, on its first try, with an alert."""
    before = {r["dag_run_id"] for r in airflow.dag_runs(f"train_{PIPELINE}")}
    version = served_version(settings)
    bad = upload(settings, key, csv_bytes([r[:4] for r in TRAINING], columns=IRIS_COLUMNS))
    run = run_of(airflow, bad, before)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alerts = [a for a in received_alerts() if a["name"] == "Flywheel: dataset rejected" and key in a["summary"]]
        if alerts:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"no alert for {key} at the webhook container: {received_alerts()}")
    assert alerts[0]["labels"]["pipeline"] == PIPELINE and "required columns" in alerts[0]["summary"]
    assert served_version(settings) == version, "the model before the rejected upload serves on"
    return {**bad, "run": run, "states": train_states(airflow, run)}


@pytest.fixture(scope="module")
def rejected_locally(settings, airflow, second) -> dict:
    return reject_one(settings, airflow, f"{PIPELINE}/no-target.csv")


def test_a_rejected_upload_alerts_the_webhook_container(rejected_locally):
    assert rejected_locally["states"]["validate"] == ("failed", 1), rejected_locally["states"]


# --- steps in containers: FLYWHEEL_RUNNER=docker ----------------------------------------------------------


def task_log(compose: Compose, run: dict, task_id: str) -> str:
    """The task's log, from the state volume where Airflow writes it."""
    folder = f"{STATE}/logs/airflow/dag_id={run['dag_id']}/run_id={run['dag_run_id']}/task_id={task_id}"
    return compose.exec("serving", "sh", "-c", f'cat "{folder}"/*.log', check=False)


def test_the_docker_runner_runs_every_step_in_its_own_container(compose, settings, airflow, rejected_locally):
    compose.files += ["-f", "tests/compose/docker-runner.yml"]
    try:
        figure("up --wait, docker runner (s)", compose.up())
        assert "FLYWHEEL_RUNNER=docker" in compose.container("airflow-scheduler")["Config"]["Env"]
        version = served_version(settings)
        good = upload(settings, f"{PIPELINE}/docker-runner.csv", iris_upload(40))
        body = wait_for_dataset(settings, good)
        figure("upload -> served, docker runner (s)", body["seconds"])
        assert int(body["model"]["version"]) > version
        train = newest_run(airflow, f"train_{PIPELINE}")
        deploy = newest_run(airflow, f"deploy_{PIPELINE}")
        for run, task, module in (
            (train, "validate", "flywheel.training.validate"),
            (train, "train", "flywheel.training.train"),
            (deploy, "build", "flywheel.serving.build"),
        ):
            assert f"[runner] {module} runs in container" in task_log(compose, run, task), (run["dag_id"], task)
        # The drift monitor's step too.
        answer_training_rows(settings, 120)
        monitor = monitor_by_hand(airflow)
        assert monitor["state"] == "success", monitor
        assert "[runner] flywheel.inference.monitor runs in container" in task_log(compose, monitor, "check")
        # A rejection is the same outcome whichever runner ran the step: the same task states.
        rejected = reject_one(settings, airflow, f"{PIPELINE}/no-target-in-a-container.csv")
        assert rejected["states"] == rejected_locally["states"]
        left = subprocess.run(
            ["docker", "ps", "--all", "--quiet", "--filter", "label=flywheel.step"], capture_output=True, text=True
        )
        assert left.stdout.split() == [], "every step container is removed"
    finally:
        del compose.files[-2:]


# --- scale-out: the celery profile ---------------------------------------------------------------------


def test_a_celery_worker_trains_with_the_celery_profile(compose, settings, airflow, iris_csv, second):
    version = served_version(settings)
    compose.profiles = ["celery"]
    compose.environment["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"
    figure("up --wait, celery profile (s)", compose.up())
    worker = compose.container("airflow-worker")["Config"]["Hostname"]
    scheduler = compose.container("airflow-scheduler")
    assert "AIRFLOW__CORE__EXECUTOR=CeleryExecutor" in scheduler["Config"]["Env"]

    uploaded = upload(settings, f"{PIPELINE}/third.csv", iris_csv)
    served = wait_served(settings, version, uploaded)
    figure("third upload -> served, Celery worker (s)", served["seconds"])
    train = newest_run(airflow, f"train_{PIPELINE}")
    assert train["state"] == "success", train
    assert task_hostname(airflow, f"train_{PIPELINE}", train["dag_run_id"], "train") == worker
    assert worker != scheduler["Config"]["Hostname"]
    deploy = newest_run(airflow, f"deploy_{PIPELINE}")
    assert task_hostname(airflow, f"deploy_{PIPELINE}", deploy["dag_run_id"], "rollout") == worker
