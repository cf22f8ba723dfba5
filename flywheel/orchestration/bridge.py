"""The events bridge's logic: uploads in (MinIO's notifications), asset events out, and its control loops.

MinIO tells of each upload twice: at once, and from its queue dir, where it keeps every notification
until the bridge answers 2xx and retries it, one at a time, ahead of every later upload. The first
delivery handled counts (deliveries.py). Nothing that may take long is left in that queue:
- an upload of a pipeline that can train now becomes an asset event on `s3://datasets/<p>`;
- an upload of a pipeline whose file does not load, or whose DAG Airflow has not parsed yet, is
  **held** (operations/parked.py) and handed to Airflow as soon as it can be (`release_held`);
- what no retry can fix (a folder no pipeline owns, an Airflow 4xx) is a **dead letter**;
- only what passes in seconds (Airflow unreachable, a 5xx) is answered 503 (`Retry`), so MinIO retries.

Control loops (services/events_bridge/app.py runs them every few seconds): routes (Nginx follows the
pipeline files), held uploads released, broken pipeline files alerted (and resolved), the reconciler
(an upload no run accounted for, with no run queued or running, gets its asset event again), and the
alert outbox.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from flywheel.clients.airflow_rest import AirflowAPI, AirflowRejected, AirflowUnavailable
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines
from flywheel.core.schema import parse_time
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload
from flywheel.operations import alerts
from flywheel.operations.parked import DEAD_LETTERS, HELD
from flywheel.orchestration import notifications
from flywheel.orchestration.deliveries import Deliveries
from flywheel.serving import live
from flywheel.training import ledger

log = logging.getLogger("uvicorn.error")  # uvicorn's handler: lines reach the bridge's log

SETTLE_SECONDS = 20.0  # an event this young may still start its run the ordinary way
BACKOFF = (60.0, 900.0)  # first and longest wait before re-emitting for a pipeline that made no progress
UNPARSED_ALERT_SECONDS = 120.0  # a valid pipeline file whose DAG Airflow has not parsed for this long

EVENTS = Counter("flywheel_bridge_events", "Uploads MinIO reported, by what the bridge did", ["outcome"])
RECONCILED = Counter("flywheel_bridge_reconciled", "Asset events re-emitted for unaccounted uploads", ["pipeline"])
DEAD_LETTER_COUNT = Gauge("flywheel_bridge_dead_letters", "Uploads in the dead-letter folder")
HELD_COUNT = Gauge("flywheel_bridge_held", "Uploads held until their pipeline trains again")


class Retry(RuntimeError):
    """A notification MinIO should deliver again in a moment (the bridge answers 503)."""


class NotParsedYet(AirflowUnavailable):
    pass


def emit(airflow: AirflowAPI, pipeline: pipelines.Pipeline, upload: Upload, asset_id: int | None = None) -> dict:
    """The upload as an asset event on its pipeline's dataset asset (NotParsedYet until Airflow has it)."""
    if not pipeline.triggers(upload.key):
        raise AirflowRejected(f"{upload.key} does not start a {pipeline.name} run")
    asset_id = asset_id or airflow.asset_id(pipeline.dataset_uri)
    if asset_id is None:
        raise NotParsedYet(f"Airflow has no asset {pipeline.dataset_uri} yet (train_{pipeline.name} not parsed)")
    created = airflow.create_asset_event(asset_id, upload.to_dict())
    log.info("asset event %s on %s for %s (etag %s)", created.get("id"), pipeline.dataset_uri, upload.key, upload.etag)
    return {"asset_uri": pipeline.dataset_uri, "key": upload.key, "asset_event_id": created.get("id")}


@dataclass
class Reconciling:
    """Per pipeline: when the reconciler last re-emitted, and how long it waits before the next."""

    emitted_at: float = 0.0
    backoff: float = BACKOFF[0]


@dataclass
class Bridge:
    settings: Settings
    airflow: AirflowAPI
    asset_ids: dict[str, int] = field(default_factory=dict)
    reconciling: dict[str, Reconciling] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # pipeline -> the error an alert was raised for
    unparsed_since: dict[str, float] = field(default_factory=dict)
    deliveries: Deliveries = field(init=False)

    def __post_init__(self) -> None:
        self.deliveries = Deliveries(self.settings.state / "bridge" / "deliveries.db")
        DEAD_LETTER_COUNT.set_function(lambda: DEAD_LETTERS.count(self.settings))
        HELD_COUNT.set_function(lambda: HELD.count(self.settings))

    # --- uploads in ---------------------------------------------------------------------------------

    def asset_id(self, pipeline: pipelines.Pipeline) -> int:
        """Airflow's id of the pipeline's dataset asset, looked up once (NotParsedYet until it has one)."""
        uri = pipeline.dataset_uri
        if uri not in self.asset_ids:
            found = self.airflow.asset_id(uri)
            if found is None:
                raise NotParsedYet(f"Airflow has no asset {uri} yet (train_{pipeline.name} not parsed)")
            self.asset_ids[uri] = found
        return self.asset_ids[uri]

    def forward(self, pipeline: pipelines.Pipeline, upload: Upload) -> dict:
        """The upload as an asset event (NotParsedYet, AirflowRejected, AirflowUnavailable otherwise)."""
        try:
            return emit(self.airflow, pipeline, upload, self.asset_id(pipeline))
        except AirflowRejected:
            self.asset_ids.pop(pipeline.dataset_uri, None)  # Airflow's database may have been reset
            raise

    def dead_letter(self, upload: Upload, reason: str, record: dict | None = None) -> dict:
        path = DEAD_LETTERS.write(self.settings, reason, upload.to_dict(), record)
        EVENTS.labels("dead_lettered").inc()
        log.warning("dead letter %s for %s: %s", path.name, upload.key, reason)
        return {"key": upload.key, "reason": reason, "dead_letter": path.stem}

    def hold(self, upload: Upload, reason: str) -> dict:
        path = HELD.write(self.settings, reason, upload.to_dict())
        EVENTS.labels("held").inc()
        log.warning("held %s until its pipeline trains again: %s", upload.key, reason)
        return {"key": upload.key, "reason": reason, "held": path.stem}

    def receive(self, body: dict) -> dict:
        """A MinIO notification: each upload forwarded, ignored, held or dead-lettered, once however many
        times MinIO tells of it (deliveries.py); Retry for a 503."""
        known, broken = pipelines.load_all(self.settings.pipelines_dir)
        known = {p.name: p for p in known}
        done: dict[str, list] = {"forwarded": [], "ignored": [], "held": [], "dead_lettered": [], "duplicate": []}
        for upload in notifications.uploads(body):
            with self.deliveries.first(upload) as first:
                if not first:
                    done["duplicate"].append({"key": upload.key, "reason": "already handled"})
                    EVENTS.labels("duplicate").inc()
                    continue
                outcome, item = self._act(upload, known.get(upload.pipeline), upload.pipeline in broken, body)
                done[outcome].append(item)
        return done

    def _act(self, upload: Upload, pipeline: pipelines.Pipeline | None, broken: bool, body: dict) -> tuple[str, dict]:
        if broken:
            return "held", self.hold(upload, f"pipelines/{upload.pipeline}.yaml does not load")
        if pipeline is None:
            folder = f"datasets/{upload.pipeline}/" if upload.pipeline else "the root of datasets/"
            return "dead_lettered", self.dead_letter(upload, f"no pipeline owns {folder} (pipelines/*.yaml)", body)
        if not pipeline.triggers(upload.key):
            # e.g. one half of an IDX set: its run starts when the set's _SUCCESS marker lands
            EVENTS.labels("ignored").inc()
            return "ignored", {"key": upload.key, "reason": f"does not start a {pipeline.name} run"}
        try:
            forwarded = self.forward(pipeline, upload)
        except NotParsedYet as exc:
            return "held", self.hold(upload, str(exc))
        except AirflowRejected as exc:
            return "dead_lettered", self.dead_letter(upload, f"Airflow refused the asset event: {exc}", body)
        except AirflowUnavailable as exc:
            EVENTS.labels("retry").inc()
            log.warning("keeping %s in MinIO's queue: %s", upload.key, exc)
            raise Retry(str(exc)) from exc
        EVENTS.labels("forwarded").inc()
        return "forwarded", forwarded

    # --- control loops ------------------------------------------------------------------------------

    def release_held(self) -> list[str]:
        """Hand held uploads to Airflow once their pipeline can train; an upload whose pipeline file is
        gone becomes a dead letter. Returns the keys released."""
        known, broken = pipelines.load_all(self.settings.pipelines_dir)
        known = {p.name: p for p in known}
        released = []
        for entry in HELD.read_all(self.settings):
            upload = Upload.from_dict(entry["upload"])
            if upload.pipeline in broken:
                continue
            if upload.pipeline not in known:
                self.dead_letter(upload, f"held, and then pipelines/{upload.pipeline}.yaml was removed")
            elif known[upload.pipeline].triggers(upload.key):  # else: one half of an IDX set, say
                try:
                    self.forward(known[upload.pipeline], upload)
                except NotParsedYet:
                    continue
            HELD.remove(self.settings, entry["id"])
            released.append(upload.key)
        return released

    def watch_pipelines(self, now: float | None = None) -> list[dict]:
        """An alert when a pipeline file stops loading (or its DAG stays unparsed), resolved when it trains
        again: sent here, returned too."""
        now = time.monotonic() if now is None else now
        known, broken = pipelines.load_all(self.settings.pipelines_dir)
        problems = {name: f"pipelines/{name}.yaml does not load: {exc}" for name, exc in broken.items()}
        for p in known:
            try:
                self.asset_id(p)
                self.unparsed_since.pop(p.name, None)
            except NotParsedYet:
                since = self.unparsed_since.setdefault(p.name, now)
                if now - since > UNPARSED_ALERT_SECONDS:
                    problems[p.name] = f"Airflow has not parsed train_{p.name} for {now - since:.0f} s"
        sent = []
        for name, problem in problems.items():
            if self.broken.get(name) != problem:
                self.broken[name] = problem
                sent.append(alerts.alert("bridge", "Flywheel: pipeline broken", problem, {"pipeline": name}))
        for name in [n for n in self.broken if n not in problems]:
            sent.append(
                alerts.alert(
                    "bridge", "Flywheel: pipeline broken", f"{name} loads again", {"pipeline": name}, "resolved"
                )
            )
            del self.broken[name]
        if sent:
            alerts.notify(self.settings, sent)
        return sent

    def reconcile_once(self, now: float | None = None) -> list[str]:
        """Re-emit the newest unaccounted upload of every pipeline nothing is training; returns their names."""
        now = time.monotonic() if now is None else now
        emitted = []
        with MlflowAPI.connect(self.settings) as mlflow:
            for pipeline in pipelines.load_all(self.settings.pipelines_dir)[0]:
                memory = self.reconciling.setdefault(pipeline.name, Reconciling())
                if self.airflow.dag_runs(f"train_{pipeline.name}", limit=1, states=("queued", "running")):
                    continue
                event = ledger.pending(self.airflow, mlflow, pipeline)
                if event is None:
                    self.reconciling[pipeline.name] = Reconciling()  # all accounted: forget the backoff
                    continue
                if time.time() - parse_time(event["timestamp"]).timestamp() < SETTLE_SECONDS:
                    continue
                if memory.emitted_at and now - memory.emitted_at < memory.backoff:
                    continue
                if memory.emitted_at:  # emitted before and still pending: that run made no progress
                    memory.backoff = min(memory.backoff * 2, BACKOFF[1])
                extra = {**(event.get("extra") or {}), "reconciled": True}
                created = self.airflow.create_asset_event(event["asset_id"], extra)
                memory.emitted_at = now
                RECONCILED.labels(pipeline.name).inc()
                log.warning(
                    "reconciler: %s has an upload no run accounted for (%s, event %s): re-emitted as event %s",
                    pipeline.name,
                    extra.get("key"),
                    event["id"],
                    created.get("id"),
                )
                emitted.append(pipeline.name)
        return emitted

    def watch_rollouts(self) -> list[str]:
        """A live rollout nobody has judged for live.ORPHANED_SECONDS (its deploy run gone for good) is
        ended: all traffic back to production, so traffic never stays split with nobody deciding."""
        ended = []
        for pipeline in pipelines.load_all(self.settings.pipelines_dir)[0]:
            state = live.orphaned(self.settings, pipeline.name)
            if state is None:
                continue
            idle = time.time() - state.heartbeat
            live.abort(self.settings, pipeline, state, f"no judge looked at it for {idle:.0f} s", log=log.warning)
            alerts.notify(
                self.settings,
                [
                    alerts.alert(
                        "bridge",
                        "Flywheel: rollout rolled back",
                        f"{pipeline.name} v{state.version}: its judge stopped looking; v{state.baseline} serves",
                        {"pipeline": pipeline.name, "version": state.version},
                    )
                ],
            )
            ended.append(pipeline.name)
        return ended
