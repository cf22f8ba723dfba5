"""Pipelines are data: one YAML file each under `pipelines/`, loaded into typed objects."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from flywheel import frameworks
from flywheel.core.errors import PipelineError

TASKS = ("classification", "regression")
# Higher is better unless listed here: the gate needs to know which way "beats" points.
LOWER_IS_BETTER = ("rmse", "mae")
METRICS = {"classification": ("accuracy",), "regression": ("rmse", "mae", "r2")}
# Replicas per colour at most: each pipeline's port block holds this many per colour.
MAX_REPLICAS = 8
# A multi-object dataset (IDX images + labels) is complete when this marker lands in its folder.
READY_MARKER = "_SUCCESS"
IDX_PARTS = ("images", "labels")


@dataclass(frozen=True)
class Validation:
    """Rules every upload must pass before training."""

    min_rows: int = 20
    max_bytes: int = 200 * 1024 * 1024
    max_missing_rate: float = 0.0
    min_class_fraction: float = 0.0


STRATEGIES = ("bluegreen", "shadow", "canary", "ab")


@dataclass(frozen=True)
class Rollout:
    """How a promoted challenger goes live (`rollout:` in the pipeline file; serving/live.py)."""

    strategy: str = "bluegreen"
    steps: tuple[int, ...] = (10, 50, 100)  # canary: % of requests to the candidate, step by step
    bake_seconds: float = 30.0  # per step, at least
    min_requests: int = 50  # candidate answers per step before any decision
    # Guardrails, the candidate against production over the same window:
    error_ratio: float = 0.01  # more 5xx answers than production's ratio plus this
    p99_ms: float = 100.0  # slower at p99 than production's plus this
    live_score_drop: float = 0.05  # a live score (on feedback labels) lower by more than this
    min_feedback: int = 30  # labelled rows per arm before the live score counts
    shadow_sample: float = 1.0  # share of requests mirrored
    shadow_min_requests: int = 200
    shadow_max_disagreement: float = 0.2
    shadow_then: str = "canary"  # canary | bluegreen
    ab_split: int = 50  # % of keys to the candidate
    ab_key: str = "X-User-Id"  # the request header that makes assignment sticky
    ab_min_samples: int = 500  # labelled rows per arm before the test
    ab_max_samples: int = 5000  # ...and the most it waits for before keeping production
    ab_alpha: float = 0.05

    @property
    def live(self) -> bool:
        """Whether a challenger is judged on live traffic before it is `production`."""
        return self.strategy != "bluegreen"


@dataclass(frozen=True)
class Monitor:
    """Drift watch on what production answers (`monitor:` in the pipeline file; inference/drift.py).

    Every `every_minutes`, the last `window_minutes` of answers are compared with the serving
    version's training profile, feature by feature: a feature drifts when its test rejects "same
    distribution" at `alpha` (Bonferroni-corrected over the features) AND its distance is at least
    `min_distance` (Kolmogorov-Smirnov D for numbers, total variation for classes): with thousands
    of rows a test alone flags differences too small to matter. Fewer than `min_rows` answers in a
    window: no decision, and the window says so.
    """

    enabled: bool = True
    every_minutes: float = 5.0
    window_minutes: float = 5.0
    min_rows: int = 100
    alpha: float = 0.01
    min_distance: float = 0.2


@dataclass(frozen=True)
class Retrain:
    """When a pipeline retrains besides uploads (`retrain:` in the pipeline file)."""

    schedule: str = ""  # a cron expression or preset (@daily): Airflow's asset-or-time schedule
    on_drift: bool = False  # drift detected -> retrain
    with_feedback: bool = False  # ...on the serving version's upload plus the labelled answers since it
    cooldown_minutes: float = 60.0  # drift starts no retraining sooner than this after the last one


@dataclass(frozen=True)
class InferenceLog:
    """What of the pipeline's answers the inference log keeps (`inference_log:` in the pipeline file)."""

    # Share of answers logged, decided by a hash of the request id: the same for every copy of a request
    # (a shadow's pairs stay whole). Feedback matches logged answers only.
    sample: float = 1.0
    keep_days: int | None = None  # the Parquet log's life in MinIO; None: FLYWHEEL_RETENTION_INFERENCE_DAYS


CRON_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly")


@dataclass(frozen=True)
class Pipeline:
    name: str
    dataset_prefix: str
    format: str
    task: str
    framework: str
    metric: str
    target: str = ""
    features: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # declared label values; empty: any (at least two)
    image_shape: tuple[int, int] = ()
    max_value: float = 255.0
    params: dict[str, Any] = field(default_factory=dict)
    floor: float | None = None
    margin: float = 0.0
    holdout_fraction: float = 0.25
    holdout_object: str = ""  # a fixed holdout the user uploads; empty: a seeded split
    seed: int = 42
    validation: Validation = Validation()
    batching: bool = False  # BentoML adaptive batching for the served model (serving.batching)
    replicas: int = 2  # Bento servers per colour behind Nginx, spread over the cores (serving.replicas)
    rollout: Rollout = Rollout()
    monitor: Monitor = Monitor()
    retrain: Retrain = Retrain()
    inference_log: InferenceLog = InferenceLog()
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
    def inference_uri(self) -> str:
        """What production answered, and the feedback on it (Parquet, inference/collector.py)."""
        return f"s3://inference/{self.name}"

    @property
    def model_name(self) -> str:
        """The registered model's name in MLflow."""
        return self.name

    @property
    def is_image(self) -> bool:
        return self.format in frameworks.FORMATS[frameworks.IMAGE]

    @property
    def plugin(self) -> frameworks.Framework:
        """The framework that trains and serves this pipeline's models (flywheel/frameworks/)."""
        return frameworks.get(self.framework)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def triggers(self, key: str) -> bool:
        """Whether an uploaded object starts a training run.

        Single-object formats train on every upload. An IDX set is several objects, so only its
        completion marker (`<set>/_SUCCESS`, uploaded last) starts a run; the parts alone do not.
        """
        path = PurePosixPath(key)
        if self.holdout_object and key == self.holdout_object:
            return False  # the fixed holdout is evaluation data, not a new dataset
        if self.format == "idx":
            return path.name == READY_MARKER
        return path.name != READY_MARKER and not path.name.startswith(".")


def check_params(framework: str, params: dict, where: str) -> dict[str, Any]:
    """The parameters, checked against the framework's table; a PipelineError names the first problem."""
    if not isinstance(params, dict):
        raise PipelineError(f"{where}: parameters must be a mapping of name to value, got {params!r}")
    known = frameworks.get(framework).params
    checked = {}
    for name, value in params.items():
        if name not in known:
            raise PipelineError(f"{where}: unknown {framework} parameter {name!r}; expected one of {sorted(known)}")
        rule = known[name]
        if isinstance(rule[0], str):  # a choice
            if value not in rule:
                raise PipelineError(f"{where}: parameter {name!r} is {value!r}; expected one of {list(rule)}")
        else:
            kind, low, high = rule
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or (kind is int and float(value) != int(value)):
                expected = "a whole number" if kind is int else "a number"
                raise PipelineError(f"{where}: parameter {name!r} must be {expected}, got {value!r}")
            if not low <= value <= high:
                raise PipelineError(f"{where}: parameter {name!r} must be between {low} and {high}, got {value}")
            value = kind(value)
        checked[name] = value
    return checked


def _require(data: dict, key: str, source: str, kind: type | tuple = str) -> Any:
    if key not in data:
        raise PipelineError(f"{source}: missing required field '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise PipelineError(f"{source}: field '{key}' must be {names}, got {value!r}")
    return value


def _choice(data: dict, key: str, choices: tuple[str, ...], source: str) -> str:
    value = _require(data, key, source)
    if value not in choices:
        raise PipelineError(f"{source}: field '{key}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def _number(data: dict, key: str, source: str, default, low=None, high=None, where: str = ""):
    value = data.get(key, default)
    name = f"{where}{key}"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineError(f"{source}: field '{name}' must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise PipelineError(f"{source}: field '{name}' must be between {low} and {high}, got {value}")
    return value


def _section(data: dict, key: str, source: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise PipelineError(f"{source}: field '{key}' must be a mapping, got {value!r}")
    return value


def parse(data: Any, source: str) -> Pipeline:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping at the top level")
    known = {
        "name",
        "dataset_prefix",
        "format",
        "task",
        "framework",
        "metric",
        "target",
        "features",
        "classes",
        "image",
        "params",
        "gate",
        "holdout",
        "validation",
        "serving",
        "rollout",
        "monitor",
        "retrain",
        "inference_log",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise PipelineError(f"{source}: unknown field(s) {', '.join(unknown)}")
    name = _require(data, "name", source)
    if not name.isidentifier() or name != name.lower():
        raise PipelineError(f"{source}: field 'name' must be a lower-case identifier, got {name!r}")
    framework = _choice(data, "framework", frameworks.names(), source)
    plugin = frameworks.get(framework)
    fmt = _require(data, "format", source)
    if fmt not in plugin.formats:
        raise PipelineError(
            f"{source}: field 'format' is {fmt!r}; framework {framework!r} trains {plugin.inputs} formats "
            f"({', '.join(plugin.formats)})"
        )
    task = _choice(data, "task", TASKS, source)
    if task not in plugin.tasks:
        raise PipelineError(f"{source}: framework {framework!r} does not do {task} (it does {', '.join(plugin.tasks)})")
    metric = _choice(data, "metric", METRICS[task], source)
    fields: dict[str, Any] = {}
    if plugin.inputs == frameworks.TABLE:
        fields["target"] = _require(data, "target", source)
        features = _require(data, "features", source, list)
        if not features or not all(isinstance(f, str) for f in features) or len(set(features)) != len(features):
            raise PipelineError(f"{source}: field 'features' must be a non-empty list of distinct column names")
        if fields["target"] in features:
            raise PipelineError(f"{source}: field 'target' {fields['target']!r} is also listed in 'features'")
        fields["features"] = tuple(features)
    else:
        image = _section(data, "image", source)
        shape = image.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PipelineError(f"{source}: field 'image.shape' must be [height, width], got {shape!r}")
        fields["image_shape"] = tuple(shape)
        fields["max_value"] = float(_number(image, "max_value", source, 255.0, 1, None, "image."))
    classes = data.get("classes") or []
    if not isinstance(classes, list):
        raise PipelineError(f"{source}: field 'classes' must be a list of label values")
    gate = _section(data, "gate", source)
    holdout = _section(data, "holdout", source)
    rules = _section(data, "validation", source)
    holdout_object = holdout.get("object", "")
    prefix = data.get("dataset_prefix", f"{name}/")
    if holdout_object and not str(holdout_object).startswith(prefix):
        raise PipelineError(f"{source}: field 'holdout.object' must be a key under {prefix}")
    params = check_params(framework, _section(data, "params", source), f"{source}: field 'params'")
    serving = _section(data, "serving", source)
    unknown_serving = sorted(set(serving) - {"batching", "replicas"})
    if unknown_serving:
        raise PipelineError(f"{source}: unknown field(s) serving.{', serving.'.join(unknown_serving)}")
    batching = serving.get("batching", False)
    if not isinstance(batching, bool):
        raise PipelineError(f"{source}: field 'serving.batching' must be true or false, got {batching!r}")
    replicas = _number(serving, "replicas", source, 2, 1, MAX_REPLICAS, "serving.")
    if not isinstance(replicas, int):
        raise PipelineError(f"{source}: field 'serving.replicas' must be a whole number, got {replicas!r}")
    monitor = parse_monitor(data.get("monitor", {}), source)
    retrain = parse_retrain(_section(data, "retrain", source), source)
    if retrain.on_drift and not monitor.enabled:
        raise PipelineError(f"{source}: field 'retrain.on_drift' needs the monitor (monitor: false turns it off)")
    if retrain.with_feedback and not retrain.on_drift:
        raise PipelineError(f"{source}: field 'retrain.with_feedback' is for drift retraining: set retrain.on_drift")
    if retrain.with_feedback and plugin.inputs != frameworks.TABLE:
        raise PipelineError(
            f"{source}: field 'retrain.with_feedback' is for tables: the inference log keeps a summary of "
            "each image, not its pixels"
        )
    log_rules = _section(data, "inference_log", source)
    if unknown_log := sorted(set(log_rules) - {"sample", "keep_days"}):
        raise PipelineError(f"{source}: unknown field(s) inference_log.{', inference_log.'.join(unknown_log)}")
    keep_days = _number(log_rules, "keep_days", source, None, 1, 3650, "inference_log.")
    if keep_days is not None and keep_days != int(keep_days):
        raise PipelineError(f"{source}: field 'inference_log.keep_days' must be a whole number, got {keep_days!r}")
    return Pipeline(
        inference_log=InferenceLog(
            sample=float(_number(log_rules, "sample", source, 1.0, 0.001, 1, "inference_log.")),
            keep_days=int(keep_days) if keep_days is not None else None,
        ),
        monitor=monitor,
        retrain=retrain,
        rollout=parse_rollout(_section(data, "rollout", source), source),
        batching=batching,
        replicas=replicas,
        name=name,
        dataset_prefix=prefix,
        format=fmt,
        task=task,
        framework=framework,
        metric=metric,
        classes=tuple(str(c) for c in classes),
        params=dict(params),
        floor=_number(gate, "floor", source, None, where="gate."),
        margin=float(_number(gate, "margin", source, 0.0, 0, None, "gate.")),
        holdout_fraction=float(_number(holdout, "fraction", source, 0.25, 0.01, 0.9, "holdout.")),
        holdout_object=str(holdout_object),
        seed=int(_number(holdout, "seed", source, 42, 0, None, "holdout.")),
        validation=Validation(
            min_rows=int(_number(rules, "min_rows", source, Validation.min_rows, 2, None, "validation.")),
            max_bytes=int(_number(rules, "max_bytes", source, Validation.max_bytes, 1, None, "validation.")),
            max_missing_rate=float(_number(rules, "max_missing_rate", source, 0.0, 0, 1, "validation.")),
            min_class_fraction=float(_number(rules, "min_class_fraction", source, 0.0, 0, 0.5, "validation.")),
        ),
        source=source,
        **fields,
    )


def parse_rollout(data: dict, source: str) -> Rollout:
    """The `rollout:` block: every field optional, the defaults in `Rollout`."""
    d = Rollout()
    unknown = sorted(set(data) - {"strategy", "steps", "bake_seconds", "min_requests", "guardrails", "shadow", "ab"})
    if unknown:
        raise PipelineError(f"{source}: unknown field(s) rollout.{', rollout.'.join(unknown)}")
    strategy = data.get("strategy", d.strategy)
    if strategy not in STRATEGIES:
        raise PipelineError(
            f"{source}: field 'rollout.strategy' is {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    steps = data.get("steps", list(d.steps))
    if (
        not isinstance(steps, list)
        or not steps
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 100 for x in steps)
        or steps != sorted(set(steps))
        or steps[-1] != 100
    ):
        raise PipelineError(
            f"{source}: field 'rollout.steps' must be rising percentages ending at 100, e.g. [10, 50, 100]; "
            f"got {steps!r}"
        )
    guard = _section(data, "guardrails", source)
    shadow = _section(data, "shadow", source)
    ab = _section(data, "ab", source)
    for name, section, keys in (
        ("guardrails", guard, {"error_ratio", "p99_ms", "live_score_drop", "min_feedback"}),
        ("shadow", shadow, {"sample", "min_requests", "max_disagreement", "then"}),
        ("ab", ab, {"split", "key", "min_samples", "max_samples", "alpha"}),
    ):
        if extra := sorted(set(section) - keys):
            raise PipelineError(f"{source}: unknown field(s) rollout.{name}.{f', rollout.{name}.'.join(extra)}")
    then = shadow.get("then", d.shadow_then)
    if then not in ("canary", "bluegreen"):
        raise PipelineError(f"{source}: field 'rollout.shadow.then' is {then!r}; expected canary or bluegreen")
    key = ab.get("key", d.ab_key)
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,63}", key):
        raise PipelineError(f"{source}: field 'rollout.ab.key' must be a request header name, got {key!r}")
    where = "rollout."
    return Rollout(
        strategy=strategy,
        steps=tuple(steps),
        bake_seconds=float(_number(data, "bake_seconds", source, d.bake_seconds, 0, 3600, where)),
        min_requests=int(_number(data, "min_requests", source, d.min_requests, 0, 10**6, where)),
        error_ratio=float(_number(guard, "error_ratio", source, d.error_ratio, 0, 1, where + "guardrails.")),
        p99_ms=float(_number(guard, "p99_ms", source, d.p99_ms, 0, 60_000, where + "guardrails.")),
        live_score_drop=float(
            _number(guard, "live_score_drop", source, d.live_score_drop, 0, None, where + "guardrails.")
        ),
        min_feedback=int(_number(guard, "min_feedback", source, d.min_feedback, 1, 10**6, where + "guardrails.")),
        shadow_sample=float(_number(shadow, "sample", source, d.shadow_sample, 0.01, 1, where + "shadow.")),
        shadow_min_requests=int(
            _number(shadow, "min_requests", source, d.shadow_min_requests, 1, 10**6, where + "shadow.")
        ),
        shadow_max_disagreement=float(
            _number(shadow, "max_disagreement", source, d.shadow_max_disagreement, 0, 1, where + "shadow.")
        ),
        shadow_then=then,
        ab_split=int(_number(ab, "split", source, d.ab_split, 1, 99, where + "ab.")),
        ab_key=key,
        ab_min_samples=int(_number(ab, "min_samples", source, d.ab_min_samples, 2, 10**7, where + "ab.")),
        ab_max_samples=int(_number(ab, "max_samples", source, d.ab_max_samples, 2, 10**7, where + "ab.")),
        ab_alpha=float(_number(ab, "alpha", source, d.ab_alpha, 0.0001, 0.5, where + "ab.")),
    )


def parse_monitor(data: Any, source: str) -> Monitor:
    """The `monitor:` block, or `monitor: false` to watch nothing."""
    if data is False:
        return Monitor(enabled=False)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: field 'monitor' must be a mapping or false, got {data!r}")
    d, where = Monitor(), "monitor."
    if unknown := sorted(set(data) - {"every_minutes", "window_minutes", "min_rows", "alpha", "min_distance"}):
        raise PipelineError(f"{source}: unknown field(s) monitor.{', monitor.'.join(unknown)}")
    return Monitor(
        every_minutes=float(_number(data, "every_minutes", source, d.every_minutes, 1, 24 * 60, where)),
        window_minutes=float(_number(data, "window_minutes", source, d.window_minutes, 1, 24 * 60, where)),
        min_rows=int(_number(data, "min_rows", source, d.min_rows, 10, 10**7, where)),
        alpha=float(_number(data, "alpha", source, d.alpha, 1e-9, 0.5, where)),
        min_distance=float(_number(data, "min_distance", source, d.min_distance, 0, 1, where)),
    )


def parse_retrain(data: dict, source: str) -> Retrain:
    if unknown := sorted(set(data) - {"schedule", "on_drift", "with_feedback", "cooldown_minutes"}):
        raise PipelineError(f"{source}: unknown field(s) retrain.{', retrain.'.join(unknown)}")
    schedule = data.get("schedule") or ""
    if not isinstance(schedule, str) or not (
        schedule == "" or schedule in CRON_PRESETS or re.fullmatch(r"(\S+\s+){4}\S+", schedule.strip())
    ):
        raise PipelineError(
            f"{source}: field 'retrain.schedule' must be a cron expression of five fields or one of "
            f"{', '.join(CRON_PRESETS)}, got {schedule!r}"
        )
    flags = {}
    for key in ("on_drift", "with_feedback"):
        flags[key] = data.get(key, False)
        if not isinstance(flags[key], bool):
            raise PipelineError(f"{source}: field 'retrain.{key}' must be true or false, got {flags[key]!r}")
    if schedule and schedule not in CRON_PRESETS:
        try:  # Airflow's own cron parser, where it is installed (the DAGs are made there)
            from croniter import croniter
        except ImportError:
            croniter = None
        if croniter is not None and not croniter.is_valid(schedule):
            raise PipelineError(f"{source}: field 'retrain.schedule' {schedule!r} is not a valid cron expression")
    cooldown = float(_number(data, "cooldown_minutes", source, Retrain.cooldown_minutes, 0, 7 * 24 * 60, "retrain."))
    return Retrain(schedule=schedule.strip(), cooldown_minutes=cooldown, **flags)


def load(path: Path) -> Pipeline:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path.name}: not valid YAML: {exc}") from exc
    pipeline = parse(data, path.name)
    if pipeline.name != path.stem:
        raise PipelineError(f"{path.name}: field 'name' is {pipeline.name!r} but the file is named {path.stem!r}")
    return pipeline


def load_all(directory: Path) -> tuple[list[Pipeline], dict[str, PipelineError]]:
    """Every valid pipeline, and the error of each file that does not load, by the pipeline its file
    names (the invalid ones do not stop the others)."""
    pipelines, errors = [], {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            pipelines.append(load(path))
        except PipelineError as exc:
            errors[path.stem] = exc
        except FileNotFoundError:  # removed between the listing and the read: gone, not broken
            continue
    return pipelines, errors


def get(directory: Path, name: str) -> Pipeline:
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise PipelineError(f"no pipeline named {name!r} (looked for {path})")
    return load(path)
