"""Deploy: roll a built Bento out blue/green behind Nginx, keeping the live one until the new one is proven."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from flywheel import pipelines, stack
from flywheel.pipelines import Pipeline
from flywheel.settings import Settings

COLOURS = ("blue", "green")


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
        try:
            sup.stopProcess(program, True)
        except Exception:  # already stopped
            pass
        sup.removeProcessGroup(program)
    _conf_path(settings, program).unlink(missing_ok=True)


def _start_program(settings: Settings, program: str, bento_tag: str, port: int) -> None:
    command = [str(settings.venv_ml / "bin" / "bentoml"), "serve", bento_tag,
               "--host", settings.host, "--port", str(port)]
    lines = stack.program(program, command, settings.logs, settings.client_env(), priority=200)
    _conf_path(settings, program).write_text("\n".join(lines))
    sup = stack.supervisor(settings)
    sup.reloadConfig()
    sup.addProcessGroup(program)


def smoke_test(url: str, pipeline: Pipeline, version: str) -> dict:
    """A real prediction from the server, naming the version it was built for."""
    row = [0.0] * len(pipeline.features)
    r = httpx.post(f"{url}/predict", json={"inputs": [row]}, timeout=10)
    if r.status_code != 200:
        raise DeployFailed(f"smoke test: HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    served = str(body.get("model", {}).get("version"))
    if served != str(version) or len(body.get("predictions", [])) != 1:
        raise DeployFailed(f"smoke test: expected one prediction from version {version}, got {body}")
    return body


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


def rollout(settings: Settings, pipeline: Pipeline, version: str, bento_tag: str,
            ready_timeout: float = 180, log=print) -> Deployment:
    live = current(settings, pipeline.name)
    colour = "blue" if live is None or live.colour == "green" else "green"
    port = settings.bento_port(pipelines.index_of(settings.pipelines_dir, pipeline.name), colour)
    program = program_name(pipeline.name, colour)
    url = settings.url(port)
    log(f"starting {bento_tag} as {program} on {url} (live: {live.program if live else 'none'})")
    _remove_program(settings, program)
    _start_program(settings, program, bento_tag, port)
    try:
        stack.wait_healthy(f"{url}/readyz", ready_timeout, program)
        smoke_test(url, pipeline, version)
    except (DeployFailed, stack.StackError) as exc:
        _remove_program(settings, program)
        raise DeployFailed(f"{pipeline.name} v{version} not deployed, {live.program if live else 'nothing'} "
                           f"keeps serving: {exc}") from exc
    log(f"{program} healthy and answering as v{version}: switching Nginx")
    deployment = Deployment(pipeline.name, str(version), bento_tag, colour, port, time.time())
    _switch_nginx(settings, pipeline.name, port)
    _wait_served(settings, pipeline, version)
    _write_scrape_target(settings, deployment)
    record = _record_path(settings, pipeline.name)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(deployment)))
    if live is not None and live.colour != colour:
        time.sleep(1.0)  # let requests in flight on the old colour drain
        _remove_program(settings, live.program)
        log(f"stopped {live.program} (v{live.version})")
    return deployment


def _wait_served(settings: Settings, pipeline: Pipeline, version: str, timeout: float = 15) -> None:
    """Nginx reloads asynchronously: wait until its answers come from the new version."""
    url = f"{settings.predict_url}/{pipeline.name}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            smoke_test(url, pipeline, version)
            return
        except (DeployFailed, httpx.HTTPError):
            time.sleep(0.2)
    raise DeployFailed(f"Nginx still not serving v{version} at {url} after {timeout:.0f}s")
