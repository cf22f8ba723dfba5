"""Routes: how a request reaches a pipeline's Bentos, kept in the state folder and changed live.

- **Ports** are identities, stored, not derived: a pipeline gets a block of ports the first time it
  needs one, recorded in `ports.json`, and keeps it while its file exists or anything serves it.
  Adding or removing a pipeline file moves no other pipeline.
- **Nginx**: `nginx/locations.conf` has one `location` per pipeline, with its own body limit (from its
  largest legal request) and body buffer, proxying to its replicas or answering 503 until its first
  deployment; `nginx/upstreams/<p>.conf` lists the live colour's replicas behind `least_conn`. `sync`
  rewrites them and reloads Nginx gracefully, only when something changed, so a new pipeline file is
  routed, and a removed one that nothing serves disappears, without a restart. The events bridge
  runs it every few seconds.
- **Live rollouts** (serving/live.py): while a pipeline has a candidate, its location sends each
  request to production or to the candidate (`split`: weight % at random by request id; `sticky`:
  by a request header's value, so one user stays on one arm) and tells the Bento which arm it is
  (X-Flywheel-Role, echoed as X-Model-Role); or it answers from production and mirrors a copy to the
  candidate (`mirror`), whose answer nobody sees. `/<p>/feedback` goes to the inference service.
- **Prometheus**: one file_sd file per deployed pipeline, every replica labelled with its pipeline,
  model version, colour, role and replica.
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
MIN_BODY_LIMIT = 64 << 10  # no pipeline's body limit is lower
BODY_BUFFER = 256 << 10  # memory per request body, at most


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


def body_limit(pipeline: Pipeline) -> int:
    """The pipeline's client_max_body_size: its largest legal request, plus a quarter."""
    return max(MIN_BODY_LIMIT, pipeline.plugin.largest_request(pipeline) * 5 // 4)


def body_buffer(limit: int) -> int:
    """Memory a request body may take before Nginx spools it to a file: all of any legal table request
    (no temp file on the hot path), at most BODY_BUFFER, so that slow clients cannot take memory
    without bound (bench/slow_clients.py measures it)."""
    return min(limit, BODY_BUFFER)


def upstream_conf(pipeline: str, host: str, ports: list[int] | tuple[int, ...], suffix: str = "") -> str:
    # least_conn spreads requests over the replicas (a hung one, holding its requests, gets no new
    # ones); a request a replica fails or leaves unanswered goes to the next (proxy_next_upstream).
    # No replica is ever marked down (max_fails=0): a dead one refuses at once and costs nothing,
    # and a timed-out request must end in a 504, not in a "no live upstreams" 502.
    # keepalive + HTTP/1.1 to the Bentos: Nginx's own overhead stays within noise.
    servers = "".join(f"    server {host}:{p} max_fails=0;\n" for p in ports)
    return f"upstream flywheel_{pipeline}{suffix} {{\n    least_conn;\n{servers}    keepalive 64;\n}}\n"


CANDIDATE_UPSTREAM = "__candidate"
FEEDBACK_BODY_LIMIT = 1 << 20  # 1,000 feedback items with room to spare


def arm_conf(pipeline: str, traffic) -> str:
    """http-level: which arm each request of the pipeline goes to ($flywheel_arm_<p>), and the upstream
    that arm is ($flywheel_upstream_<p>); for a mirror, whether this request is copied ($flywheel_mirror_<p>)."""
    p = pipeline
    lines = [f"# {p}: a live rollout, {traffic.mode}"]
    if traffic.mode == "mirror":
        share = round(traffic.sample * 100, 2)
        lines += [f'map "" $flywheel_arm_{p} {{\n    default production;\n}}']
        choice = f"    {share}% 1;\n    * 0;" if share < 100 else "    * 1;"
        lines += [f'split_clients "${{flywheel_request_id}}" $flywheel_mirror_{p} {{\n{choice}\n}}']
    elif traffic.weight >= 100:
        lines += [f'map "" $flywheel_arm_{p} {{\n    default candidate;\n}}']
    elif traffic.mode == "sticky":
        header = "http_" + traffic.key.lower().replace("-", "_")
        lines += [
            f'split_clients "${{{header}}}" $flywheel_sticky_{p} {{\n    {traffic.weight}% candidate;\n'
            "    * production;\n}",
            # No key, no assignment: such requests stay on production.
            f'map ${header} $flywheel_arm_{p} {{\n    "" production;\n    default $flywheel_sticky_{p};\n}}',
        ]
    else:
        lines += [
            f'split_clients "${{flywheel_request_id}}" $flywheel_arm_{p} {{\n    {traffic.weight}% candidate;\n'
            f"    * production;\n}}"
        ]
    lines += [
        f"map $flywheel_arm_{p} $flywheel_upstream_{p} {{\n    candidate flywheel_{p}{CANDIDATE_UPSTREAM};\n"
        f"    default flywheel_{p};\n}}"
    ]
    return "\n".join(lines) + "\n"


def inference_upstream(settings: Settings) -> str:
    return (
        f"upstream flywheel_inference {{\n    server {settings.host_of(settings.ports.inference)}:"
        f"{settings.ports.inference} max_fails=0;\n    keepalive 8;\n}}\n"
    )


def routes_conf(limits: dict[str, int], default: str) -> str:
    """http-level: each route's body limit, which the 413's message quotes."""
    paths = {f"/{name}/predict": limit for name, limit in limits.items()}
    if default in limits:
        paths["/predict"] = limits[default]
    lines = [
        "# Rendered by flywheel/platform/routes.py: each route's body limit, for the 413's message.",
        "map $uri $flywheel_body_limit {",
        f"    default {MIN_BODY_LIMIT};",
        *(f"    {path} {limit};" for path, limit in sorted(paths.items())),
        "}",
    ]
    return "\n".join(lines) + "\n"


LOCATION = """location = /{name}/predict {{
    client_max_body_size {limit};
    client_body_buffer_size {buffer};
    if ($request_method != POST) {{
        return 405 '{{"error": "method not allowed: POST /{name}/predict"}}\\n';
    }}
    if ($flywheel_key = 0) {{
        return 401 '{{"error": "missing or wrong API key: send Authorization: Bearer <key>"}}\\n';
    }}
    {answer}
}}
location = /{name}/feedback {{
    client_max_body_size {feedback_limit};
    client_body_buffer_size {feedback_buffer};
    if ($request_method != POST) {{
        return 405 '{{"error": "method not allowed: POST /{name}/feedback"}}\\n';
    }}
    if ($flywheel_key = 0) {{
        return 401 '{{"error": "missing or wrong API key: send Authorization: Bearer <key>"}}\\n';
    }}
    proxy_pass http://flywheel_inference/{name}/feedback;
}}
"""
# A location that sets any proxy header loses the server's: all of them are repeated.
HEADERS = """proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Request-Id $flywheel_request_id;
    proxy_set_header X-Flywheel-Role {role};"""
SPLIT = """{headers}
    proxy_pass http://$flywheel_upstream_{name}/predict;"""
MIRRORED = """{headers}
    mirror /.shadow/{name};
    proxy_pass http://flywheel_{name}/predict;"""
# The mirrored copy: the candidate's answer is discarded; short timeouts, no retry, so a failing
# candidate costs production's clients nothing.
SHADOW = """location = /.shadow/{name} {{
    internal;
    if ($flywheel_mirror_{name} = 0) {{
        return 204;
    }}
    {headers}
    proxy_connect_timeout 1s;
    proxy_read_timeout 3s;
    proxy_next_upstream off;
    proxy_pass http://flywheel_{name}__candidate/predict;
}}
"""
WAITING = (
    """return 503 '{{"error": "no model of {name} is serving yet: upload a dataset under datasets/{name}/"}}\\n';"""
)
SERVING = "proxy_pass http://flywheel_{name}/predict;"
# /predict is the default pipeline's, with its body limit: Nginx checks a body against the location
# the request first matched, before the rewrite.
DEFAULT = """location = /predict {{
    client_max_body_size {limit};
    client_body_buffer_size {buffer};
    rewrite ^ /{name}/predict last;
}}
"""


def location_conf(name: str, serving: bool, limit: int, traffic=None) -> str:
    """A pipeline's /<name>/predict in the server block: its own body limit and buffer (Nginx takes no
    variable there), the method and API key checks, and its replicas or a 503 until one serves; with
    a candidate, the arm each request goes to. And its /<name>/feedback."""
    if not serving:
        answer = WAITING.format(name=name)
    elif traffic is None:
        answer = SERVING.format(name=name)
    elif traffic.mode == "mirror":
        answer = MIRRORED.format(name=name, headers=HEADERS.format(role="production"))
    else:
        answer = SPLIT.format(name=name, headers=HEADERS.format(role=f"$flywheel_arm_{name}"))
    conf = LOCATION.format(
        name=name,
        limit=limit,
        buffer=body_buffer(limit),
        answer=answer,
        feedback_limit=FEEDBACK_BODY_LIMIT,
        feedback_buffer=body_buffer(FEEDBACK_BODY_LIMIT),
    )
    if serving and traffic is not None and traffic.mode == "mirror":
        conf += SHADOW.format(name=name, headers=HEADERS.format(role="shadow"))
    return conf


def scrape_targets(settings: Settings, deployment, role: str = "production") -> list[dict]:
    labels = {
        "pipeline": deployment.pipeline,
        "model_version": deployment.version,
        "colour": deployment.colour,
        "role": role,
    }
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
        # A removed file's model serves until retired.
        deployed = {d.pipeline: d for d in deployments.all_current(settings)}
        # A candidate counts only beside a production it is compared with.
        candidates = {
            c.deployment.pipeline: c for c in deployments.all_candidates(settings) if c.deployment.pipeline in deployed
        }
        limits = {name: MIN_BODY_LIMIT for name in deployed} | {p.name: body_limit(p) for p in known}
        http = routes_conf(limits, settings.default_pipeline) + inference_upstream(settings)
        http += "".join(arm_conf(name, c.traffic) for name, c in sorted(candidates.items()))
        changed = _write_if_changed(nginx / "routes.conf", http)
        locations = "".join(
            location_conf(
                name, name in deployed, limits[name], candidates[name].traffic if name in candidates else None
            )
            for name in sorted(limits)
        )
        if (default := settings.default_pipeline) in limits:
            locations += DEFAULT.format(name=default, limit=limits[default], buffer=body_buffer(limits[default]))
        changed |= _write_if_changed(
            nginx / "locations.conf", f"# Rendered by flywheel/platform/routes.py.\n{locations}"
        )
        for name, d in deployed.items():
            conf = upstream_conf(name, settings.host, d.ports)
            if name in candidates:
                conf += upstream_conf(name, settings.host, candidates[name].deployment.ports, CANDIDATE_UPSTREAM)
            changed |= _write_if_changed(upstreams / f"{name}.conf", conf)
        for stale in upstreams.glob("*.conf"):
            if stale.stem not in deployed:
                stale.unlink()
                changed = True
        for name, d in deployed.items():
            found = scrape_targets(settings, d)
            if name in candidates:
                found += scrape_targets(settings, candidates[name].deployment, "candidate")
            _write_if_changed(targets / f"{name}.json", json.dumps(found))
        for stale in targets.glob("*.json"):
            if stale.stem not in deployed:
                stale.unlink()
        ports = assigned(settings)
        kept = {name: base for name, base in ports.items() if name in limits}
        if kept != ports:
            _write_json(_ports_file(settings), kept)
    if changed and reload:
        reload_nginx(settings)
    return changed


def reload_nginx(settings: Settings) -> None:
    """A graceful reload: old workers finish their requests; nothing if Nginx is not running."""
    supervisor.signal(settings, "nginx", "HUP")
