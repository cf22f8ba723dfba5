"""Deployments: what serves each pipeline (one record per pipeline) and the replica groups that do it.

A deployment is one colour's replicas of one Bento, each a supervisord program pinned to a core,
behind Nginx. serving/rollout.py decides what to deploy and when to switch; this module starts and
stops the replicas and keeps the records routes.py points Nginx and Prometheus at.

During a live rollout (serving/live.py) a pipeline has a second record, its candidate: the other
colour's replicas and the share of traffic they get (`Traffic`), in `deployments/candidates/`.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.core import pipelines
from flywheel.core.errors import PipelineError
from flywheel.core.settings import Settings
from flywheel.platform import supervisor

COLOURS = ("blue", "green")


@dataclass(frozen=True)
class Deployment:
    """What serves a pipeline: one colour's replicas of one bento, behind Nginx since `deployed_at`."""

    pipeline: str
    version: str
    bento_tag: str
    colour: str
    ports: tuple[int, ...]
    deployed_at: float
    # When each step of its rollout happened (epoch seconds): started, ready_<i>, smoked_<i>, switched,
    # served (its first answer through Nginx). What `flywheel lineage --timings` shows.
    timings: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def group(self) -> str:
        return group_name(self.pipeline, self.colour)

    @property
    def programs(self) -> list[str]:
        """Its replicas as supervisord names them (group:program)."""
        return [f"{self.group}:{replica_name(self.pipeline, self.colour, i)}" for i in range(len(self.ports))]


@dataclass(frozen=True)
class Traffic:
    """What a candidate gets: `split` (weight % of requests, at random), `sticky` (weight % of the
    values of the request header `key`; requests without it go to production) or `mirror` (a copy of
    `sample` of the requests, whose answers nobody sees)."""

    mode: str = "split"
    weight: int = 0
    key: str = ""
    sample: float = 1.0


@dataclass(frozen=True)
class Candidate:
    deployment: Deployment
    traffic: Traffic


def group_name(pipeline: str, colour: str) -> str:
    """The supervisord group of one colour's replicas."""
    return f"bento-{pipeline}-{colour}"


def replica_name(pipeline: str, colour: str, replica: int) -> str:
    return f"{group_name(pipeline, colour)}-{replica}"


def _folder(settings: Settings) -> Path:
    return settings.state / "deployments"


def _read(path: Path) -> Deployment:
    record = json.loads(path.read_text())
    record["ports"] = tuple(record.get("ports") or [record.pop("port")])  # records before replicas
    record.pop("port", None)
    return Deployment(**record)


def _write(path: Path, record: dict) -> None:
    """Whole or not at all: routes.sync may read it at any moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def current(settings: Settings, pipeline: str) -> Deployment | None:
    path = _folder(settings) / f"{pipeline}.json"
    return _read(path) if path.exists() else None


def all_current(settings: Settings) -> list[Deployment]:
    """Every pipeline's live deployment, whether or not its pipeline file still exists."""
    return [_read(path) for path in sorted(_folder(settings).glob("*.json"))]


def record(settings: Settings, pipeline: str, deployment: Deployment | None) -> None:
    """What serves the pipeline from now on (None: nothing). routes.sync makes Nginx follow."""
    path = _folder(settings) / f"{pipeline}.json"
    if deployment is None:
        path.unlink(missing_ok=True)
        return
    _write(path, asdict(deployment))


def _candidates(settings: Settings) -> Path:
    return _folder(settings) / "candidates"


def candidate(settings: Settings, pipeline: str) -> Candidate | None:
    """The pipeline's candidate under a live rollout, if one is."""
    path = _candidates(settings) / f"{pipeline}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    deployment = record["deployment"]
    deployment["ports"] = tuple(deployment["ports"])
    return Candidate(Deployment(**deployment), Traffic(**record["traffic"]))


def all_candidates(settings: Settings) -> list[Candidate]:
    return [c for path in sorted(_candidates(settings).glob("*.json")) if (c := candidate(settings, path.stem))]


def record_candidate(
    settings: Settings, pipeline: str, deployment: Deployment | None, traffic: Traffic | None = None
) -> None:
    """The candidate and its share of traffic from now on (None: no candidate). routes.sync makes Nginx follow."""
    path = _candidates(settings) / f"{pipeline}.json"
    if deployment is None:
        path.unlink(missing_ok=True)
        return
    _write(path, {"deployment": asdict(deployment), "traffic": asdict(traffic or Traffic())})


def listen_address(host: str) -> str:
    """Where a Bento listens: `host` itself if it is an IP address (embedded mode's 127.0.0.1), else
    every interface. BentoML takes only addresses; a host name is compose's `serving`, the container
    the Bento runs in, whose other servers listen on every interface too."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host


def replica_home(settings: Settings, name: str) -> Path:
    """A replica's own BENTOML_HOME: links to the shared bento and model stores, and its own
    `prometheus_multiproc_dir`, which `bentoml serve` empties as it starts. With one home for every
    Bento, each replica's /metrics summed every Bento's counts, and a new colour's start wiped the
    serving colour's files, so Prometheus' figures per version (the canary's guardrails) mixed arms."""
    home = settings.bentoml_home / "replicas" / name
    home.mkdir(parents=True, exist_ok=True)
    for store in ("bentos", "models", "envs"):
        (settings.bentoml_home / store).mkdir(parents=True, exist_ok=True)
        link = home / store
        if not link.is_symlink():
            link.symlink_to(Path("..") / ".." / store)  # relative: the same in every container that mounts it
    return home


def start_replicas(settings: Settings, pipeline: str, colour: str, bento_tag: str, ports: list[int]) -> None:
    """One supervisord program per replica, each pinned to its own core, started together as a group."""
    group = group_name(pipeline, colour)
    try:  # the inference log's share of answers (`inference_log.sample`)
        sample = pipelines.get(settings.pipelines_dir, pipeline).inference_log.sample
    except PipelineError:
        sample = 1.0
    sections: supervisor.Sections = {}
    names = []
    for i, port in enumerate(ports):
        command = [  # BentoML's serve, its port refusing connections until the model is loaded (serving/replica.py)
            str(settings.venv_ml / "bin" / "python"),
            str(settings.repo / "flywheel" / "serving" / "replica.py"),
            "serve",
            bento_tag,
            "--host",
            listen_address(settings.host),
            "--port",
            str(port),
        ]
        name = replica_name(pipeline, colour, i)
        env = {
            **settings.serving_env(),
            "FLYWHEEL_REQUEST_LOG": str(settings.logs / f"{name}.requests.log"),
            "FLYWHEEL_INFERENCE_SPOOL": str(settings.inference_spool / pipeline / f"{name}.jsonl"),
            "FLYWHEEL_INFERENCE_SAMPLE": str(sample),
            "BENTOML_HOME": str(replica_home(settings, name)),
        }
        sections.update(supervisor.program(settings, name, command, env, priority=200, cpus=supervisor.cpus_for(i)))
        names.append(name)
    supervisor.add_group(settings, group, {**sections, **supervisor.group(group, names)})


def stop_replicas(settings: Settings, pipeline: str, colour: str) -> None:
    supervisor.remove_group(settings, group_name(pipeline, colour))
