"""Routes: how a request reaches a pipeline's Bentos, kept in the state folder and changed live.

- **Ports** are identities, stored, not derived: a pipeline gets a block of ports the first time it
  needs one, recorded in `ports.json`, and keeps it while its file exists or anything serves it.
  Adding or removing a pipeline file moves no other pipeline.
- **Nginx**: `nginx/routes.conf` maps each pipeline to `serving` or `waiting` (routed, 503 until its
  first deployment) and sets the body limit from the largest legal request; `nginx/upstreams/<p>.conf`
  lists the live colour's replicas behind `least_conn`. `sync` rewrites them and reloads Nginx
  gracefully, only when something changed, so a new pipeline file is routed, and a removed one that
  nothing serves disappears, without a restart. The events bridge runs it every few seconds.
- **Prometheus**: one file_sd file per deployed pipeline, every replica labelled with its pipeline,
  model version, colour and replica.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from flywheel.core import pipelines
from flywheel.core.pipelines import MAX_REPLICAS, Pipeline
from flywheel.core.settings import Settings
from flywheel.platform import deployments, supervisor
from flywheel.platform.deployments import COLOURS

BLOCK = len(COLOURS) * MAX_REPLICAS
MIN_BODY_LIMIT = 1 << 20


# --- ports ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(settings: Settings):
    """One writer at a time: the deploy task and the bridge's sync may both assign ports."""
    settings.state.mkdir(parents=True, exist_ok=True)
    with open(settings.state / "routes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ports_file(settings: Settings) -> Path:
    return settings.state / "ports.json"


def assigned(settings: Settings) -> dict[str, int]:
    """Every pipeline's first port, as recorded."""
    try:
        return json.loads(_ports_file(settings).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.rename(path)


def block(settings: Settings, pipeline: str) -> int:
    """The pipeline's first port: the one recorded, else the lowest free block, recorded now."""
    with _locked(settings):
        ports = assigned(settings)
        if pipeline not in ports:
            taken = set(ports.values())
            ports[pipeline] = next(
                base for k in range(1000) if (base := settings.ports.bento_base + k * BLOCK) not in taken
            )
            _write_json(_ports_file(settings), ports)
        return ports[pipeline]


def port(base: int, colour: str, replica: int) -> int:
    return base + COLOURS.index(colour) * MAX_REPLICAS + replica


def replica_ports(settings: Settings, pipeline: str, colour: str, replicas: int) -> list[int]:
    base = block(settings, pipeline)
    return [port(base, colour, i) for i in range(replicas)]


# --- Nginx and Prometheus ---------------------------------------------------------------------------------


def body_limit(known: list[Pipeline]) -> int:
    """Nginx's client_max_body_size: the largest legal request of any pipeline, plus a quarter."""
    return max([MIN_BODY_LIMIT, *(p.plugin.largest_request(p) * 5 // 4 for p in known)])


def upstream_conf(pipeline: str, host: str, ports: list[int]) -> str:
    # least_conn spreads requests over the replicas; a replica that fails is taken out for a moment
    # (max_fails/fail_timeout) while Nginx passes its requests to the next (proxy_next_upstream).
    # keepalive + HTTP/1.1 to the Bentos: Nginx's own overhead stays within noise.
    servers = "".join(f"    server {host}:{p} max_fails=1 fail_timeout=2s;\n" for p in ports)
    return f"upstream flywheel_{pipeline} {{\n    least_conn;\n{servers}    keepalive 64;\n}}\n"


def routes_conf(states: dict[str, str], limit: int) -> str:
    lines = [
        "# Rendered by flywheel/routes.py: which pipelines exist, and whether one serves yet.",
        f"client_max_body_size {limit};",
        f"client_body_buffer_size {limit};  # bodies stay in memory: no temp file on the hot path",
        "map $pipeline $flywheel_body_limit {",
        f"    default {limit};",
        "}",
        "map $pipeline $flywheel_route {",
        "    default unknown;",
        *(f"    {name} {state};" for name, state in sorted(states.items())),
        "}",
    ]
    return "\n".join(lines) + "\n"


def scrape_targets(settings: Settings, deployment) -> list[dict]:
    labels = {"pipeline": deployment.pipeline, "model_version": deployment.version, "colour": deployment.colour}
    return [
        {"targets": [f"{settings.host}:{p}"], "labels": {**labels, "replica": str(i)}}
        for i, p in enumerate(deployment.ports)
    ]


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)
    return True


def sync(settings: Settings, reload: bool = True) -> bool:
    """Bring Nginx's routes, the scrape targets and the port blocks in line with the pipeline files
    and the deployments. Reloads Nginx (gracefully) if a route changed; True if anything did."""
    nginx = settings.state / "nginx"
    upstreams, targets = nginx / "upstreams", settings.state / "prometheus" / "targets"
    for folder in (upstreams, targets):
        folder.mkdir(parents=True, exist_ok=True)
    known = pipelines.load_all(settings.pipelines_dir)[0]
    with _locked(settings):
        deployed = {d.pipeline: d for d in deployments.all_current(settings)}
        states = {p.name: "serving" if p.name in deployed else "waiting" for p in known}
        states.update(dict.fromkeys(deployed, "serving"))  # a removed file's model serves until retired
        changed = _write_if_changed(nginx / "routes.conf", routes_conf(states, body_limit(known)))
        for name, d in deployed.items():
            changed |= _write_if_changed(upstreams / f"{name}.conf", upstream_conf(name, settings.host, d.ports))
        for stale in upstreams.glob("*.conf"):
            if stale.stem not in deployed:
                stale.unlink()
                changed = True
        for name, d in deployed.items():
            _write_if_changed(targets / f"{name}.json", json.dumps(scrape_targets(settings, d)))
        for stale in targets.glob("*.json"):
            if stale.stem not in deployed:
                stale.unlink()
        ports = assigned(settings)
        kept = {name: base for name, base in ports.items() if name in states}
        if kept != ports:
            _write_json(_ports_file(settings), kept)
    if changed and reload:
        reload_nginx(settings)
    return changed


def reload_nginx(settings: Settings) -> None:
    """A graceful reload: old workers finish their requests; nothing if Nginx is not running."""
    supervisor.signal(settings, "nginx", "HUP")
