"""Pipelines are data: one YAML file each under `pipelines/`, loaded into typed objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMATS = ("csv",)
TASKS = ("classification", "regression")
FRAMEWORKS = ("xgboost",)


class PipelineError(ValueError):
    """A pipeline file with a mistake; the message names the file and the field."""


@dataclass(frozen=True)
class Pipeline:
    name: str
    dataset_prefix: str
    format: str
    task: str
    target: str
    features: tuple[str, ...]
    framework: str
    metric: str
    params: dict[str, Any] = field(default_factory=dict)
    floor: float = 0.0
    holdout_fraction: float = 0.25
    seed: int = 42
    source: str = ""

    # Asset URIs: the names the Airflow Asset view shows.
    @property
    def dataset_uri(self) -> str:
        return f"s3://datasets/{self.name}"

    @property
    def model_uri(self) -> str:
        return f"model://{self.name}/production"

    @property
    def deployment_uri(self) -> str:
        return f"deployment://{self.name}/production"

    @property
    def model_name(self) -> str:
        """The registered model's name in MLflow."""
        return self.name


def _require(data: dict, key: str, source: str, kind: type | tuple = str) -> Any:
    if key not in data:
        raise PipelineError(f"{source}: missing required field '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise PipelineError(f"{source}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _choice(data: dict, key: str, choices: tuple[str, ...], source: str) -> str:
    value = _require(data, key, source)
    if value not in choices:
        raise PipelineError(f"{source}: field '{key}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def parse(data: Any, source: str) -> Pipeline:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping at the top level")
    name = _require(data, "name", source)
    if not name.isidentifier() or name != name.lower():
        raise PipelineError(f"{source}: field 'name' must be a lower-case identifier, got {name!r}")
    features = _require(data, "features", source, list)
    if not features or not all(isinstance(f, str) for f in features):
        raise PipelineError(f"{source}: field 'features' must be a non-empty list of column names")
    gate = data.get("gate") or {}
    holdout = data.get("holdout") or {}
    fraction = float(holdout.get("fraction", 0.25))
    if not 0 < fraction < 1:
        raise PipelineError(f"{source}: field 'holdout.fraction' must be between 0 and 1, got {fraction}")
    return Pipeline(
        name=name,
        dataset_prefix=data.get("dataset_prefix", f"{name}/"),
        format=_choice(data, "format", FORMATS, source),
        task=_choice(data, "task", TASKS, source),
        target=_require(data, "target", source),
        features=tuple(features),
        framework=_choice(data, "framework", FRAMEWORKS, source),
        metric=_require(data, "metric", source),
        params=dict(data.get("params") or {}),
        floor=float(gate.get("floor", 0.0)),
        holdout_fraction=fraction,
        seed=int(holdout.get("seed", 42)),
        source=source,
    )


def load(path: Path) -> Pipeline:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path.name}: not valid YAML: {exc}") from exc
    pipeline = parse(data, path.name)
    if pipeline.name != path.stem:
        raise PipelineError(f"{path.name}: field 'name' is {pipeline.name!r} but the file is named {path.stem!r}")
    return pipeline


def load_all(directory: Path) -> tuple[list[Pipeline], list[PipelineError]]:
    """Every valid pipeline, and the errors of the invalid ones (which do not stop the others)."""
    pipelines, errors = [], []
    for path in sorted(directory.glob("*.yaml")):
        try:
            pipelines.append(load(path))
        except PipelineError as exc:
            errors.append(exc)
    return pipelines, errors


def get(directory: Path, name: str) -> Pipeline:
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise PipelineError(f"no pipeline named {name!r} (looked for {path})")
    return load(path)


def index_of(directory: Path, name: str) -> int:
    """A stable small number per pipeline, used to give each its own pair of Bento ports."""
    names = sorted(p.stem for p in directory.glob("*.yaml"))
    return names.index(name)
