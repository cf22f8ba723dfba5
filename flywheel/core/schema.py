"""The MLflow schema: every tag, alias and artifact name Flywheel writes, and the typed records they make.

Renaming a tag is a one-line change here: every writer and reader goes through these records.

- A **training run** (an MLflow run in the pipeline's experiment) says which upload it was given,
  who started it, and what became of it: a gate decision, a rejection, or a skip (`RunRecord`).
  The run that accounts for uploads also carries the **ledger** (`Entry`, `Watermark`).
- A **model version** says where it came from, what it takes and answers, the gate's verdict, and
  what became of its deployment (`VersionRecord`).
- **Aliases** say what serves: `production`, and `previous`, the rollback target.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field, replace

from flywheel.core.upload import Upload

# --- aliases and artifacts ----------------------------------------------------------------------------

PRODUCTION = "production"
PREVIOUS = "previous"  # the rollback target
CANDIDATE = "candidate"  # a challenger that won offline, judged on live traffic (serving/live.py)

SMOKE_ARTIFACT = "smoke/holdout.json"  # holdout rows the deploy step replays through a new Bento
LEDGER_ARTIFACT = "flywheel/uploads.json"

# --- tag names ------------------------------------------------------------------------------------------

PIPELINE = "flywheel.pipeline"
AIRFLOW_RUN = "airflow.run_id"
# The upload, on runs and versions alike.
UPLOAD_URI = "dataset.uri"
UPLOAD_KEY = "dataset.key"
UPLOAD_ETAG = "dataset.etag"
UPLOAD_VERSION_ID = "dataset.version_id"
# Who started a training run, and with what.
TRIGGER = "flywheel.trigger"
TRIGGERED_BY = "flywheel.triggered_by"
NOTE = "flywheel.note"
OVERRIDES = "flywheel.overrides"
# What became of it.
DECISION = "flywheel.decision"  # the gate's: promoted or rejected; `skipped` when nothing trained
STATUS = "flywheel.status"  # `rejected`: the upload broke a rule; `failed`: a step failed on it
STAGE = "flywheel.stage"
REASON = "flywheel.reason"
MODEL_VERSION = "flywheel.model_version"
# The uploads ledger, on the run that accounted for them.
LEDGER = "flywheel.uploads"
WATERMARK = "flywheel.events_through"
# A model version's contract: what it takes and answers.
FRAMEWORK = "flywheel.framework"
TASK = "flywheel.task"
METRIC = "flywheel.metric"
FEATURES = "flywheel.features"
IMAGE_SHAPE = "flywheel.image_shape"
MAX_VALUE = "flywheel.max_value"
CLASSES = "flywheel.classes"
# The gate's verdict on a version.
CHALLENGER_SCORE = "flywheel.challenger_score"
PRODUCTION_VERSION = "flywheel.production_version"
PRODUCTION_SCORE = "flywheel.production_score"
# What became of its deployment.
DEPLOYMENT = "flywheel.deployment"  # serving, retired or failed
DEPLOYMENT_REASON = "flywheel.deployment_reason"
# Its live rollout: `running: <step>`, `promoted: <why>` or `aborted: <guardrail, figures>`; an A/B
# test's figures, test, p-value and decision (JSON).
ROLLOUT = "flywheel.rollout"
AB_TEST = "flywheel.ab_test"

PROMOTED, NOT_PROMOTED, SKIPPED = "promoted", "rejected", "skipped"  # DECISION values
REJECTED, FAILED = "rejected", "failed"  # STATUS values: the upload broke a rule; a step failed
SERVING, RETIRED, DEPLOY_FAILED = "serving", "retired", "failed"  # DEPLOYMENT values

MAX_TAG = 4900  # MLflow keeps at most 5,000 characters of a tag


class SchemaError(ValueError):
    """A run or version whose tags do not say what Flywheel needs; the message names the tag."""


def tag_filter(name: str, value: str) -> str:
    """An MLflow search filter on one tag's exact value."""
    return f"tags.`{name}` = '{value.replace(chr(39), chr(39) * 2)}'"


def has_tag(name: str) -> str:
    return f"tags.`{name}` LIKE '%'"


def upload_tags(upload: Upload) -> dict[str, str]:
    return {
        UPLOAD_URI: upload.uri,
        UPLOAD_KEY: upload.key,
        UPLOAD_ETAG: upload.etag,
        UPLOAD_VERSION_ID: upload.version_id,
    }


def upload_from_tags(tags: dict[str, str], pipeline: str = "") -> Upload | None:
    uri = tags.get(UPLOAD_URI, "")
    if not uri.startswith("s3://"):
        return None
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    return Upload(
        pipeline or tags.get(PIPELINE, ""),
        bucket,
        tags.get(UPLOAD_KEY) or uri.removeprefix(f"s3://{bucket}/"),
        tags.get(UPLOAD_ETAG, ""),
        tags.get(UPLOAD_VERSION_ID, ""),
    )


# --- training runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """Who started a training run and with what: an upload, or a person (with their choices)."""

    kind: str = "upload"  # upload | manual | schedule (retrain.schedule) | drift (monitor_<p>)
    by: str = ""
    note: str = ""
    overrides: dict = field(default_factory=dict)
    dataset: str = ""  # the key or version id a person chose; empty: the newest upload

    @property
    def manual(self) -> bool:
        return self.kind == "manual"

    @property
    def retrains(self) -> bool:
        """Whether the run trains the newest data even if it was trained before: a person's run, a
        scheduled one, or one drift asked for."""
        return self.kind in ("manual", "schedule", "drift")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Trigger:
        data = data or {}
        return cls(
            str(data.get("kind") or "upload"),
            str(data.get("by") or ""),
            str(data.get("note") or ""),
            dict(data.get("overrides") or {}),
            str(data.get("dataset") or ""),
        )


@dataclass(frozen=True)
class RunRecord:
    """What an MLflow run of a pipeline says about itself (its tags)."""

    pipeline: str
    upload: Upload | None = None
    airflow_run: str = ""
    trigger: Trigger | None = None
    decision: str = ""  # PROMOTED, NOT_PROMOTED or SKIPPED
    status: str = ""  # REJECTED (the upload broke a rule) or FAILED (a step failed on it)
    stage: str = ""
    reason: str = ""
    model_version: str = ""

    @property
    def decided(self) -> bool:
        """It trained and gated the upload, or rejected it: that upload needs no other training."""
        return (bool(self.decision) and self.decision != SKIPPED) or self.status == REJECTED

    @property
    def outcome(self) -> str:
        return self.decision or self.status

    def tags(self) -> dict[str, str]:
        tags = {PIPELINE: self.pipeline, AIRFLOW_RUN: self.airflow_run}
        if self.upload is not None:
            tags.update(upload_tags(self.upload))
        if self.trigger is not None:
            tags.update(
                {
                    TRIGGER: self.trigger.kind,
                    TRIGGERED_BY: self.trigger.by,
                    NOTE: self.trigger.note[:MAX_TAG],
                    OVERRIDES: json.dumps(self.trigger.overrides),
                }
            )
        for name, value in (
            (DECISION, self.decision),
            (STATUS, self.status),
            (STAGE, self.stage),
            (REASON, self.reason[:MAX_TAG]),
            (MODEL_VERSION, self.model_version),
        ):
            if value:
                tags[name] = value
        return tags

    def with_outcome(self, **changes) -> RunRecord:
        return replace(self, **changes)

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RunRecord:
        trigger = None
        if TRIGGER in tags:
            try:
                overrides = json.loads(tags.get(OVERRIDES) or "{}")
            except ValueError:
                overrides = {}
            trigger = Trigger(tags[TRIGGER], tags.get(TRIGGERED_BY, ""), tags.get(NOTE, ""), overrides)
        return cls(
            pipeline=tags.get(PIPELINE, ""),
            upload=upload_from_tags(tags),
            airflow_run=tags.get(AIRFLOW_RUN, ""),
            trigger=trigger,
            decision=tags.get(DECISION, ""),
            status=tags.get(STATUS, ""),
            stage=tags.get(STAGE, ""),
            reason=tags.get(REASON, ""),
            model_version=tags.get(MODEL_VERSION, ""),
        )


# --- the uploads ledger ---------------------------------------------------------------------------------

LEDGER_ROLES = ("trained", "rejected", "failed", "superseded")


def parse_time(value: str) -> datetime.datetime:
    """Airflow's and MinIO's ISO times (with `Z` or an offset) as aware datetimes."""
    parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True, order=True)
class Watermark:
    """The last asset event a run accounted for: events are ordered by (timestamp, id)."""

    timestamp: str
    id: int

    def key(self) -> tuple[datetime.datetime, int]:
        return parse_time(self.timestamp), self.id

    def to_tag(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_tag(cls, value: str | None) -> Watermark | None:
        try:
            data = json.loads(value or "")
            return cls(str(data["timestamp"]), int(data["id"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Entry:
    """One upload in the ledger: its asset event, the object version, and what became of it."""

    event_id: int
    event_timestamp: str
    key: str
    etag: str
    version_id: str
    event_time: str
    role: str  # one of LEDGER_ROLES
    by: str  # what trained instead, or which MLflow run trained it


def ledger_summary(entries: list[Entry]) -> str:
    """The ledger in one tag: the keys per role, shortened to fit MLflow's tag limit."""
    roles: dict[str, list[str]] = {}
    for entry in entries:
        roles.setdefault(entry.role, []).append(entry.key)
    text = json.dumps(roles)
    if len(text) > MAX_TAG:
        text = json.dumps({role: len(keys) for role, keys in roles.items()} | {"see": LEDGER_ARTIFACT})
    return text


def ledger_tags(entries: list[Entry], mark: Watermark | None) -> dict[str, str]:
    tags = {LEDGER: ledger_summary(entries)}
    if mark is not None:
        tags[WATERMARK] = mark.to_tag()
    return tags


def ledger_document(entries: list[Entry]) -> list[dict]:
    return [asdict(e) for e in entries]


def watermark_of(tags: dict[str, str]) -> Watermark | None:
    return Watermark.from_tag(tags.get(WATERMARK))


# --- model versions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What a model version takes and answers, so a Bento can be built for it from its tags alone."""

    framework: str
    task: str
    metric: str = ""
    features: tuple[str, ...] = ()  # tables
    image_shape: tuple[int, ...] = ()  # images: (height, width)
    max_value: float = 0.0  # images: the largest pixel value
    classes: tuple[str, ...] = ()  # classifiers: index -> label

    def tags(self) -> dict[str, str]:
        tags = {FRAMEWORK: self.framework, TASK: self.task, METRIC: self.metric}
        if self.image_shape:
            tags[IMAGE_SHAPE] = json.dumps(list(self.image_shape))
            tags[MAX_VALUE] = json.dumps(self.max_value)
        else:
            tags[FEATURES] = json.dumps(list(self.features))
        if self.classes:
            tags[CLASSES] = json.dumps(list(self.classes))
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str], where: str) -> Contract:
        """Read back, or SchemaError naming the tag that is missing or malformed."""

        def parsed(name: str, check, expected: str):
            raw = tags.get(name)
            if not raw:
                raise SchemaError(f"{where} lacks the tag {name}")
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if not check(value):
                raise SchemaError(f"{where}: tag {name} is {raw!r}, expected {expected}")
            return value

        framework = tags.get(FRAMEWORK) or "xgboost"  # versions without the tag predate image models
        task = tags.get(TASK, "")
        if task not in ("classification", "regression"):
            raise SchemaError(f"{where} has task {task!r} (tag {TASK}); expected classification or regression")
        fields = {"framework": framework, "task": task, "metric": tags.get(METRIC, "")}
        if IMAGE_SHAPE in tags:
            fields["image_shape"] = tuple(
                parsed(
                    IMAGE_SHAPE,
                    lambda v: isinstance(v, list) and len(v) == 2 and all(type(s) is int and s > 0 for s in v),
                    "[height, width]",
                )
            )
            fields["max_value"] = float(
                parsed(
                    MAX_VALUE,
                    lambda v: not isinstance(v, bool) and isinstance(v, int | float) and 0 < v < float("inf"),
                    "a positive number",
                )
            )
        else:
            fields["features"] = tuple(
                str(f) for f in parsed(FEATURES, lambda v: isinstance(v, list) and v, "a list of column names")
            )
        if task == "classification":
            fields["classes"] = tuple(
                str(c)
                for c in parsed(CLASSES, lambda v: isinstance(v, list) and len(v) >= 2, "a list of at least 2 labels")
            )
        return cls(**fields)


@dataclass(frozen=True)
class Evaluation:
    """The gate's verdict on a challenger, scored against production on the same holdout."""

    challenger_score: float
    production_version: str
    production_score: float | None
    decision: str  # PROMOTED or NOT_PROMOTED
    reason: str

    def tags(self) -> dict[str, str]:
        return {
            CHALLENGER_SCORE: str(self.challenger_score),
            PRODUCTION_VERSION: self.production_version,
            PRODUCTION_SCORE: "" if self.production_score is None else str(self.production_score),
            DECISION: self.decision,
            REASON: self.reason[:MAX_TAG],
        }


@dataclass(frozen=True)
class VersionRecord:
    """What a registered model version says about itself."""

    pipeline: str
    version: str
    run_id: str
    upload: Upload | None
    tags: dict[str, str] = field(repr=False)

    @classmethod
    def from_mlflow(cls, pipeline: str, version: str, run_id: str, tags: dict[str, str]) -> VersionRecord:
        return cls(pipeline, str(version), run_id or "", upload_from_tags(tags, pipeline), dict(tags))

    @property
    def where(self) -> str:
        return f"model version {self.pipeline} v{self.version}"

    def contract(self) -> Contract:
        return Contract.from_tags(self.tags, self.where)

    @property
    def decision(self) -> str:
        return self.tags.get(DECISION, "")

    @property
    def deployment(self) -> str:
        return self.tags.get(DEPLOYMENT, "")

    @property
    def deployment_reason(self) -> str:
        return self.tags.get(DEPLOYMENT_REASON, "")

    @property
    def rollout(self) -> str:
        """How its live rollout went (`running: …`, `promoted: …`, `aborted: …`); empty for blue/green."""
        return self.tags.get(ROLLOUT, "")


def version_tags(pipeline: str, upload: Upload, contract: Contract, evaluation: Evaluation) -> dict[str, str]:
    """What a registered version carries from birth: provenance, its contract, the gate's verdict."""
    return {PIPELINE: pipeline, **upload_tags(upload), **contract.tags(), **evaluation.tags()}


def deployment_tags(state: str, reason: str) -> dict[str, str]:
    return {DEPLOYMENT: state, DEPLOYMENT_REASON: reason[:MAX_TAG]}
