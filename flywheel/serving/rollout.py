"""Rollout: a built Bento goes live blue/green, proven before it takes traffic; the live one stays on failure.

The idle colour's replicas start (platform/deployments.py) and must pass `/readyz`; each replays the
holdout rows training stored for that version, which must reproduce the recorded score. Only then
does the deployment record change, Nginx follow (platform/routes.py) and the old colour drain and
stop. What became of each version's deployment is on its MLflow tags (core/schema.py).
"""

from __future__ import annotations

import json
import time

import httpx

from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.scores import score
from flywheel.core.settings import Settings
from flywheel.core.waiting import WaitTimeout, wait_until
from flywheel.platform import deployments, routes, stack
from flywheel.platform.deployments import Deployment

DRAIN_SECONDS = 2.0
# A served model must reproduce the score it was promoted with, on the same rows, within this.
SMOKE_TOLERANCE = 0.02


class DeployFailed(RuntimeError):
    """The new Bentos never became healthy or failed their smoke test; the old ones keep serving."""


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
    with MlflowAPI.connect(settings) as mlflow:
        run_id = mlflow.model_version(pipeline, version)["run_id"]
        return json.loads(mlflow.run_artifact(run_id, schema.SMOKE_ARTIFACT))


def mark(settings: Settings, pipeline: str, version: str, state: str, reason: str) -> None:
    """Record on the registered version what became of its deployment, and why."""
    with MlflowAPI.connect(settings) as mlflow:
        for key, value in schema.deployment_tags(state, reason).items():
            mlflow.set_version_tag(pipeline, version, key, value)


def aliases_follow_what_serves(settings: Settings, pipeline: Pipeline, failed: str, live: Deployment | None) -> str:
    """After a failed rollout, MLflow's aliases say what serves: `production` goes back to the live
    version (or, with nothing live, away), and `previous` to the newest version retired before it.
    Nothing changes if `production` no longer names the failed version (a rollback moved it). Says what moved.
    """
    name = pipeline.model_name
    with MlflowAPI.connect(settings) as mlflow:
        if mlflow.version_by_alias(name, schema.PRODUCTION) != str(failed):
            return ""
        if live is None:
            mlflow.delete_alias(name, schema.PRODUCTION)
            return f"`{schema.PRODUCTION}` removed: nothing serves"
        mlflow.set_alias(name, schema.PRODUCTION, live.version)
        moved = f"`{schema.PRODUCTION}` back to v{live.version}, which serves"
        if mlflow.version_by_alias(name, schema.PREVIOUS) == live.version:
            older = next(
                (
                    v["version"]
                    for v in mlflow.versions(name)
                    if int(v["version"]) < int(live.version) and v["tags"].get(schema.DEPLOYMENT) == schema.RETIRED
                ),
                None,
            )
            if older is None:
                mlflow.delete_alias(name, schema.PREVIOUS)
            else:
                mlflow.set_alias(name, schema.PREVIOUS, older)
            moved += f", `{schema.PREVIOUS}` to {f'v{older}' if older else 'none'}"
        return moved


def aliases_name_what_serves(settings: Settings, pipeline: Pipeline, version: str) -> None:
    """The version that now takes all traffic is `production` (the one it replaces `previous`), and no
    longer `candidate`: a live rollout's winner, or one that went live without a live rollout (the
    first one, a rollback, blue/green; training named it `candidate` with nothing to compare to).
    A newer `candidate` (trained meanwhile) keeps its alias."""
    name = pipeline.model_name
    with MlflowAPI.connect(settings) as mlflow:
        if mlflow.version_by_alias(name, schema.CANDIDATE) == version:
            mlflow.delete_alias(name, schema.CANDIDATE)
        old = mlflow.version_by_alias(name, schema.PRODUCTION)
        if old != version:
            if old is not None:
                mlflow.set_alias(name, schema.PREVIOUS, old)
            mlflow.set_alias(name, schema.PRODUCTION, version)


def switch(settings: Settings, pipeline: str, deployment: Deployment | None) -> None:
    """What serves the pipeline from now on: its record, then Nginx's routes and the scrape targets."""
    deployments.record(settings, pipeline, deployment)
    routes.sync(settings)


def _start_and_prove(
    settings: Settings, pipeline: Pipeline, version: str, bento_tag: str, colour: str, ready_timeout: float, log
) -> tuple[Deployment, dict]:
    """The colour's replicas of the Bento, started, ready, and each reproducing the recorded holdout score."""
    ports = routes.replica_ports(settings, pipeline.name, colour, pipeline.replicas)
    deployments.stop_replicas(settings, pipeline.name, colour)
    timings = {"started": time.time()}
    deployments.start_replicas(settings, pipeline.name, colour, bento_tag, ports)
    deployment = Deployment(pipeline.name, str(version), bento_tag, colour, tuple(ports), time.time(), timings)
    smoke = load_smoke_set(settings, pipeline.name, version)
    for i, port in enumerate(ports):
        url = settings.url(port)
        # Cheap to ask often: a starting replica's port refuses connections until it is ready (replica.py).
        stack.wait_healthy(
            f"{url}/readyz", ready_timeout, deployments.replica_name(pipeline.name, colour, i), interval=0.1
        )
        timings[f"ready_{i}"] = time.time()
        got = smoke_test(url, version, smoke)
        timings[f"smoked_{i}"] = time.time()
        log(
            f"replica {i} ({url}) answers as v{version}: {smoke['metric']} {got:.4f} on {len(smoke['truth'])} "
            f"holdout rows (recorded {smoke['recorded']:.4f})"
        )
    return deployment, smoke


def idle_colour(live: Deployment | None) -> str:
    return "blue" if live is None or live.colour == "green" else "green"


def start_candidate(
    settings: Settings, pipeline: Pipeline, version: str, bento_tag: str, ready_timeout: float = 180, log=print
) -> Deployment:
    """A live rollout's first step: the challenger's replicas on the idle colour, proven as for blue/green,
    taking no traffic yet (serving/live.py gives it its share). On failure they stop and production serves on."""
    live = deployments.current(settings, pipeline.name)
    colour = idle_colour(live)
    group = deployments.group_name(pipeline.name, colour)
    log(f"starting {bento_tag} as the candidate, {group}; v{live.version} serves")
    try:
        deployment, _ = _start_and_prove(settings, pipeline, version, bento_tag, colour, ready_timeout, log)
    except (DeployFailed, stack.StackError, RuntimeError, httpx.HTTPError) as exc:
        deployments.stop_replicas(settings, pipeline.name, colour)
        reason = f"{pipeline.name} v{version} not deployed as a candidate, v{live.version} serves on: {exc}"
        mark(settings, pipeline.name, version, schema.DEPLOY_FAILED, reason)
        with MlflowAPI.connect(settings) as mlflow:
            if mlflow.version_by_alias(pipeline.model_name, schema.CANDIDATE) == str(version):
                mlflow.delete_alias(pipeline.model_name, schema.CANDIDATE)
        raise DeployFailed(reason) from exc
    return deployment


def rollout(
    settings: Settings, pipeline: Pipeline, version: str, bento_tag: str, ready_timeout: float = 180, log=print
) -> Deployment:
    """Start the idle colour's replicas, prove each, switch Nginx, stop the old colour; on failure keep the old."""
    live = deployments.current(settings, pipeline.name)
    colour = idle_colour(live)
    group = deployments.group_name(pipeline.name, colour)
    keeps = f"{live.group} (v{live.version}) keeps serving" if live else "nothing was serving"
    log(f"starting {bento_tag} as {group}: {pipeline.replicas} replica(s); {keeps} meanwhile")
    switched = False
    try:
        deployment, smoke = _start_and_prove(settings, pipeline, version, bento_tag, colour, ready_timeout, log)
        log(f"switching Nginx to {group}")
        deployment.timings["switched"] = time.time()
        switch(settings, pipeline.name, deployment)
        switched = True
        _wait_served(settings, pipeline, version, smoke)
        deployment.timings["served"] = time.time()
        deployments.record(settings, pipeline.name, deployment)  # with its first answer's time
    except (DeployFailed, stack.StackError, RuntimeError, httpx.HTTPError) as exc:
        if switched:
            switch(settings, pipeline.name, live)
        deployments.stop_replicas(settings, pipeline.name, colour)
        reason = f"{pipeline.name} v{version} not deployed, {keeps}: {exc}"
        mark(settings, pipeline.name, version, schema.DEPLOY_FAILED, reason)
        if moved := aliases_follow_what_serves(settings, pipeline, str(version), live):
            reason += f"; {moved}"
        raise DeployFailed(reason) from exc
    mark(
        settings,
        pipeline.name,
        version,
        schema.SERVING,
        f"{group} on ports {list(deployment.ports)} since {time.ctime()}",
    )
    aliases_name_what_serves(settings, pipeline, str(version))
    if live is not None and live.colour != colour:
        time.sleep(DRAIN_SECONDS)  # requests in flight on the old colour finish
        deployments.stop_replicas(settings, pipeline.name, live.colour)
        if live.version != str(version):
            mark(settings, pipeline.name, live.version, schema.RETIRED, f"replaced by v{version} at {time.ctime()}")
        log(f"stopped {live.group} (v{live.version})")
    return deployment


def retire(settings: Settings, pipeline: str) -> Deployment | None:
    """Stop serving a pipeline: its Bentos stop, and its route, scrape targets and ports go once its
    file is gone too (routes.sync). Returns what served it."""
    live = deployments.current(settings, pipeline)
    for colour in deployments.COLOURS:
        deployments.stop_replicas(settings, pipeline, colour)
    switch(settings, pipeline, None)
    return live


def _wait_served(settings: Settings, pipeline: Pipeline, version: str, smoke: dict, timeout: float = 15) -> None:
    """Nginx reloads asynchronously: wait until its answers come from the new version."""
    with Client(settings) as client:
        try:
            wait_until(
                lambda: client.served_version(pipeline.name, smoke["inputs"][0]) == str(version),
                timeout,
                f"Nginx serving v{version} at /{pipeline.name}/predict",
                interval=0.2,
            )
        except WaitTimeout as exc:
            raise DeployFailed(str(exc)) from exc
