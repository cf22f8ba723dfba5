"""Deploy: roll a built Bento out blue/green behind Nginx, keeping the live one until the new one is proven."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from flywheel import pipelines, stack
from flywheel.metrics import SMOKE_ARTIFACT, score
from flywheel.mlflow_api import MlflowAPI
from flywheel.pipelines import Pipeline
from flywheel.settings import Settings

COLOURS = ("blue", "green")
DRAIN_SECONDS = 2.0


class DeployFailed(RuntimeError):
    """The new Bento never became healthy or failed its smoke test; the old one keeps serving."""


@dataclass(frozen=True)
class Deployment:
    pipeline: str
    version: str
    bento_tag: str
    colour: str
    port: int
    deployed_at: float

    @property
    def program(self) -> str:
        return program_name(self.pipeline, self.colour)


def program_name(pipeline: str, colour: str) -> str:
    return f"bento-{pipeline}-{colour}"


def _record_path(settings: Settings, pipeline: str) -> Path:
    return settings.state / "deployments" / f"{pipeline}.json"


def current(settings: Settings, pipeline: str) -> Deployment | None:
    path = _record_path(settings, pipeline)
    return Deployment(**json.loads(path.read_text())) if path.exists() else None


def _conf_path(settings: Settings, program: str) -> Path:
    return settings.state / "supervisor" / "conf.d" / f"{program}.conf"


def _remove_program(settings: Settings, program: str) -> None:
    sup = stack.supervisor(settings)
    names = {p["name"] for p in sup.getAllProcessInfo()}
    if program in names:
        with contextlib.suppress(Exception):  # already stopped
            sup.stopProcess(program, True)
        sup.removeProcessGroup(program)
    _conf_path(settings, program).unlink(missing_ok=True)


def _start_program(settings: Settings, program: str, bento_tag: str, port: int) -> None:
    command = [
        str(settings.venv_ml / "bin" / "bentoml"),
        "serve",
        bento_tag,
        "--host",
        settings.host,
        "--port",
        str(port),
    ]
    lines = stack.program(settings, program, command, settings.client_env(), priority=200)
    _conf_path(settings, program).write_text("\n".join(lines))
    sup = stack.supervisor(settings)
    sup.reloadConfig()
    sup.addProcessGroup(program)


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
    mlflow = MlflowAPI(settings.mlflow_url)
    try:
        run_id = mlflow.model_version(pipeline, version)["run_id"]
        return json.loads(mlflow.run_artifact(run_id, SMOKE_ARTIFACT))
    finally:
        mlflow.close()


def mark_failed(settings: Settings, pipeline: str, version: str, reason: str) -> None:
    mlflow = MlflowAPI(settings.mlflow_url)
    try:
        mlflow.set_version_tag(pipeline, version, "flywheel.deployment", "failed")
        mlflow.set_version_tag(pipeline, version, "flywheel.deployment_reason", reason[:4900])
    finally:
        mlflow.close()


def _switch_nginx(settings: Settings, pipeline: str, port: int) -> None:
    upstream = settings.state / stack.NGINX_DIR / "upstreams" / f"{pipeline}.conf"
    tmp = upstream.with_suffix(".tmp")
    tmp.write_text(stack.upstream_conf(pipeline, settings.host, port))
    tmp.rename(upstream)
    stack.supervisor(settings).signalProcess("nginx", "HUP")  # graceful: old workers finish their requests


def _write_scrape_target(settings: Settings, deployment: Deployment) -> None:
    target = settings.state / "prometheus" / "targets" / f"{deployment.pipeline}.json"
    labels = {"pipeline": deployment.pipeline, "model_version": deployment.version, "colour": deployment.colour}
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [f"{settings.host}:{deployment.port}"], "labels": labels}]))
    tmp.rename(target)


def rollout(
    settings: Settings, pipeline: Pipeline, version: str, bento_tag: str, ready_timeout: float = 180, log=print
) -> Deployment:
    """Start the idle colour, prove it, switch Nginx, stop the old colour; on any failure keep the old."""
    live = current(settings, pipeline.name)
    colour = "blue" if live is None or live.colour == "green" else "green"
    port = settings.bento_port(pipelines.index_of(settings.pipelines_dir, pipeline.name), colour)
    program = program_name(pipeline.name, colour)
    url = settings.url(port)
    keeps = f"{live.program} (v{live.version}) keeps serving" if live else "nothing was serving"
    log(f"starting {bento_tag} as {program} on {url} (live: {live.program if live else 'none'})")
    _remove_program(settings, program)
    _start_program(settings, program, bento_tag, port)
    switched = False
    try:
        stack.wait_healthy(f"{url}/readyz", ready_timeout, program)
        smoke = load_smoke_set(settings, pipeline.name, version)
        got = smoke_test(url, version, smoke)
        log(
            f"{program} answers as v{version}: {smoke['metric']} {got:.4f} on {len(smoke['truth'])} holdout rows "
            f"(recorded {smoke['recorded']:.4f}); switching Nginx"
        )
        _switch_nginx(settings, pipeline.name, port)
        switched = True
        _wait_served(settings, pipeline, version, smoke)
    except (DeployFailed, stack.StackError, RuntimeError, httpx.HTTPError) as exc:
        if switched and live is not None:
            _switch_nginx(settings, pipeline.name, live.port)
        _remove_program(settings, program)
        reason = f"{pipeline.name} v{version} not deployed, {keeps}: {exc}"
        mark_failed(settings, pipeline.name, version, reason)
        raise DeployFailed(reason) from exc
    deployment = Deployment(pipeline.name, str(version), bento_tag, colour, port, time.time())
    _write_scrape_target(settings, deployment)
    record = _record_path(settings, pipeline.name)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(deployment)))
    if live is not None and live.colour != colour:
        time.sleep(DRAIN_SECONDS)  # requests in flight on the old colour finish
        _remove_program(settings, live.program)
        log(f"stopped {live.program} (v{live.version})")
    return deployment


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

    mlflow = MlflowAPI(settings.mlflow_url)
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
