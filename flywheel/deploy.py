"""Deploy: roll a built Bento out blue/green behind Nginx, keeping the live one until the new one is proven."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from flywheel import routes, stack
from flywheel.metrics import SMOKE_ARTIFACT, score
from flywheel.mlflow_api import MlflowAPI
from flywheel.pipelines import Pipeline
from flywheel.routes import COLOURS
from flywheel.settings import Settings

DRAIN_SECONDS = 2.0


class DeployFailed(RuntimeError):
    """The new Bentos never became healthy or failed their smoke test; the old ones keep serving."""


@dataclass(frozen=True)
class Deployment:
    """What serves a pipeline: one colour's replicas of one bento, behind Nginx since `deployed_at`."""

    pipeline: str
    version: str
    bento_tag: str
    colour: str
    ports: tuple[int, ...]
    deployed_at: float

    @property
    def group(self) -> str:
        return group_name(self.pipeline, self.colour)

    @property
    def programs(self) -> list[str]:
        return [f"{self.group}:{replica_name(self.pipeline, self.colour, i)}" for i in range(len(self.ports))]


def group_name(pipeline: str, colour: str) -> str:
    """The supervisord group of one colour's replicas."""
    return f"bento-{pipeline}-{colour}"


def replica_name(pipeline: str, colour: str, replica: int) -> str:
    return f"{group_name(pipeline, colour)}-{replica}"


def _record_path(settings: Settings, pipeline: str) -> Path:
    return settings.state / "deployments" / f"{pipeline}.json"


def _read(path: Path) -> Deployment:
    record = json.loads(path.read_text())
    record["ports"] = tuple(record.get("ports") or [record.pop("port")])  # records before replicas
    record.pop("port", None)
    return Deployment(**record)


def current(settings: Settings, pipeline: str) -> Deployment | None:
    path = _record_path(settings, pipeline)
    return _read(path) if path.exists() else None


def all_current(settings: Settings) -> list[Deployment]:
    """Every pipeline's live deployment, whether or not its pipeline file still exists."""
    return [_read(path) for path in sorted((settings.state / "deployments").glob("*.json"))]


def _conf_path(settings: Settings, group: str) -> Path:
    return settings.state / "supervisor" / "conf.d" / f"{group}.conf"


def _remove_group(settings: Settings, group: str) -> None:
    sup = stack.supervisor(settings)
    groups = {p["group"] for p in sup.getAllProcessInfo()}
    if group in groups:
        with contextlib.suppress(Exception):  # already stopped
            sup.stopProcessGroup(group, True)
        sup.removeProcessGroup(group)
    _conf_path(settings, group).unlink(missing_ok=True)


def listen_address(host: str) -> str:
    """Where a Bento listens: `host` itself if it is an IP address (embedded mode's 127.0.0.1), else
    every interface. BentoML takes only addresses; a host name is compose's `serving`, the container
    the Bento runs in, whose other servers listen on every interface too."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host


def _start_group(settings: Settings, pipeline: str, colour: str, bento_tag: str, ports: list[int]) -> None:
    """One supervisord program per replica, each pinned to its own core, started together as a group."""
    group = group_name(pipeline, colour)
    lines = []
    for i, port in enumerate(ports):
        command = [
            str(settings.venv_ml / "bin" / "bentoml"),
            "serve",
            bento_tag,
            "--host",
            listen_address(settings.host),
            "--port",
            str(port),
        ]
        name = replica_name(pipeline, colour, i)
        env = {**settings.serving_env(), "FLYWHEEL_REQUEST_LOG": str(settings.logs / f"{name}.requests.log")}
        lines += stack.program(settings, name, command, env, priority=200, cpus=routes.cpus_for(i))
    lines += [
        f"[group:{group}]",
        f"programs={','.join(replica_name(pipeline, colour, i) for i in range(len(ports)))}",
        "",
    ]
    stack.write_private(_conf_path(settings, group), "\n".join(lines))
    sup = stack.supervisor(settings)
    sup.reloadConfig()
    sup.addProcessGroup(group)


# A served model must reproduce the score it was promoted with, on the same rows, within this.
SMOKE_TOLERANCE = 0.02


def smoke_test(url: str, version: str, smoke: dict, chunk: int = 100) -> float:
    """Replay the stored holdout rows through the server; its score must match the recorded one."""
    predicted = []
    for start in range(0, len(smoke["inputs"]), chunk):
        r = httpx.post(f"{url}/predict", json={"inputs": smoke["inputs"][start : start + chunk]}, timeout=30)
        if r.status_code != 200:
            raise DeployFailed(f"smoke test: HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        served = str(body.get("model", {}).get("version"))
        if served != str(version):
            raise DeployFailed(f"smoke test: the server answers as v{served}, expected v{version}")
        predicted.extend(body["predictions"])
    got = score(smoke["metric"], predicted, smoke["truth"])
    recorded = smoke["recorded"]
    allowed = SMOKE_TOLERANCE * max(1.0, abs(recorded)) if smoke["metric"] in ("rmse", "mae") else SMOKE_TOLERANCE
    if abs(got - recorded) > allowed:
        raise DeployFailed(
            f"smoke test: {smoke['metric']} {got:.4f} on {len(predicted)} holdout rows, "
            f"MLflow recorded {recorded:.4f} (tolerance {allowed:.4f})"
        )
    return got


def load_smoke_set(settings: Settings, pipeline: str, version: str) -> dict:
    mlflow = MlflowAPI.connect(settings)
    try:
        run_id = mlflow.model_version(pipeline, version)["run_id"]
        return json.loads(mlflow.run_artifact(run_id, SMOKE_ARTIFACT))
    finally:
        mlflow.close()


DEPLOYMENT_TAG = "flywheel.deployment"  # on the model version: serving, retired or failed


def mark(settings: Settings, pipeline: str, version: str, state: str, reason: str) -> None:
    """Record on the registered version what became of its deployment, and why."""
    with MlflowAPI.connect(settings) as mlflow:
        mlflow.set_version_tag(pipeline, version, DEPLOYMENT_TAG, state)
        mlflow.set_version_tag(pipeline, version, "flywheel.deployment_reason", reason[:4900])


def mark_failed(settings: Settings, pipeline: str, version: str, reason: str) -> None:
    mark(settings, pipeline, version, "failed", reason)


def _record(settings: Settings, pipeline: str, deployment: Deployment | None) -> None:
    """What serves the pipeline from now on; routes.sync points Nginx and Prometheus at it."""
    path = _record_path(settings, pipeline)
    if deployment is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(deployment)))
        tmp.rename(path)
    routes.sync(settings)


def rollout(
    settings: Settings, pipeline: Pipeline, version: str, bento_tag: str, ready_timeout: float = 180, log=print
) -> Deployment:
    """Start the idle colour's replicas, prove each, switch Nginx, stop the old colour; on failure keep the old."""
    live = current(settings, pipeline.name)
    colour = "blue" if live is None or live.colour == "green" else "green"
    ports = routes.replica_ports(settings, pipeline.name, colour, pipeline.replicas)
    group = group_name(pipeline.name, colour)
    keeps = f"{live.group} (v{live.version}) keeps serving" if live else "nothing was serving"
    log(f"starting {bento_tag} as {group}: {len(ports)} replica(s) on ports {ports}; {keeps} meanwhile")
    _remove_group(settings, group)
    _start_group(settings, pipeline.name, colour, bento_tag, ports)
    deployment = Deployment(pipeline.name, str(version), bento_tag, colour, tuple(ports), time.time())
    switched = False
    try:
        smoke = load_smoke_set(settings, pipeline.name, version)
        for i, port in enumerate(ports):
            url = settings.url(port)
            stack.wait_healthy(f"{url}/readyz", ready_timeout, replica_name(pipeline.name, colour, i))
            got = smoke_test(url, version, smoke)
            log(
                f"replica {i} ({url}) answers as v{version}: {smoke['metric']} {got:.4f} on {len(smoke['truth'])} "
                f"holdout rows (recorded {smoke['recorded']:.4f})"
            )
        log(f"switching Nginx to {group}")
        _record(settings, pipeline.name, deployment)
        switched = True
        _wait_served(settings, pipeline, version, smoke)
    except (DeployFailed, stack.StackError, RuntimeError, httpx.HTTPError) as exc:
        if switched:
            _record(settings, pipeline.name, live)
        _remove_group(settings, group)
        reason = f"{pipeline.name} v{version} not deployed, {keeps}: {exc}"
        mark_failed(settings, pipeline.name, version, reason)
        raise DeployFailed(reason) from exc
    mark(settings, pipeline.name, version, "serving", f"{group} on ports {list(ports)} since {time.ctime()}")
    if live is not None and live.colour != colour:
        time.sleep(DRAIN_SECONDS)  # requests in flight on the old colour finish
        _remove_group(settings, live.group)
        if live.version != str(version):
            mark(settings, pipeline.name, live.version, "retired", f"replaced by v{version} at {time.ctime()}")
        log(f"stopped {live.group} (v{live.version})")
    return deployment


def retire(settings: Settings, pipeline: str) -> Deployment | None:
    """Stop serving a pipeline: its Bentos stop, and its route, scrape targets and ports go once its
    file is gone too (routes.sync). Returns what served it."""
    live = current(settings, pipeline)
    for colour in COLOURS:
        _remove_group(settings, group_name(pipeline, colour))
    _record(settings, pipeline, None)
    return live


def _wait_served(settings: Settings, pipeline: Pipeline, version: str, smoke: dict, timeout: float = 15) -> None:
    """Nginx reloads asynchronously: wait until its answers come from the new version."""
    url = f"{settings.predict_url}/{pipeline.name}/predict"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json={"inputs": smoke["inputs"][:1]}, timeout=10)
            if r.status_code == 200 and str(r.json()["model"]["version"]) == str(version):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DeployFailed(f"Nginx still not serving v{version} at {url} after {timeout:.0f}s")


class RollbackImpossible(RuntimeError):
    pass


def rollback(settings: Settings, pipeline: Pipeline) -> dict:
    """Put `previous` back into production and let the deploy DAG roll it out, like any promotion.

    The aliases swap (the rolled-back version becomes `previous`, so a second rollback undoes the
    first), and a production-model asset event records why, so the lineage shows the rollback.
    """
    from flywheel.airflow_api import AirflowAPI

    mlflow = MlflowAPI.connect(settings)
    try:
        current_version = mlflow.version_by_alias(pipeline.model_name, "production")
        previous = mlflow.version_by_alias(pipeline.model_name, "previous")
        if previous is None:
            raise RollbackImpossible(f"{pipeline.name} has no `previous` version to roll back to")
        mlflow.set_alias(pipeline.model_name, "production", previous)
        if current_version is not None:
            mlflow.set_alias(pipeline.model_name, "previous", current_version)
        mv = mlflow.model_version(pipeline.model_name, previous)
    finally:
        mlflow.close()
    extra = {
        "pipeline": pipeline.name,
        "model_name": pipeline.model_name,
        "version": previous,
        "run_id": mv.get("run_id", ""),
        "dataset": {k: mv["tags"].get(f"dataset.{k}", "") for k in ("uri", "key", "etag", "version_id")},
        "reason": f"rollback from v{current_version}",
        "rollback_from": current_version,
    }
    airflow = AirflowAPI.connect(settings)
    try:
        asset_id = airflow.asset_id(pipeline.model_uri)
        if asset_id is None:
            raise RollbackImpossible(f"Airflow has no asset {pipeline.model_uri}")
        airflow.create_asset_event(asset_id, extra)
    finally:
        airflow.close()
    return extra
