"""Retention: nothing the platform writes grows without bound, and nothing lineage needs is deleted.

The `flywheel_retention` DAG enforces each policy of `Settings.retention` (core/settings.py) every
hour, one task per store, and each writes a report (`retention/<store>.json` in the state folder)
that `flywheel status` shows:

- **datasets**: noncurrent versions of uploads (overwritten or deleted) and old delete markers, past
  their age, in the versioned `datasets` bucket. Ours rather than a MinIO lifecycle rule: a rule
  cannot exclude the versions that trained what serves (MinIO filters only include, by prefix or
  tag), and lineage needs those.
- **models**: Bentos and BentoML model-store copies beyond the newest N per pipeline (serving/prune.py,
  a step in the ML environment); production, previous and whatever serves are always kept.
- **airflow**: Airflow's run metadata (`airflow db clean`) and task log files past their age.
- **files**: recorded alerts and the outbox, dead letters, each past its age; Nginx's access log
  copied and emptied past its size. Prometheus keeps its TSDB by its own flags.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from flywheel.clients import objectstore
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines, schema
from flywheel.core.settings import Retention, Settings, write_private
from flywheel.operations import alerts
from flywheel.operations.parked import DEAD_LETTERS
from flywheel.platform import deployments, topology

ACCESS_LOGS_KEPT = 3
# Before a version's upload and its MLflow run: its asset event comes after the upload, and its Airflow
# run starts before the MLflow run by its plan and validate tasks (seconds; minutes on a busy host).
LINEAGE_MARGIN = datetime.timedelta(minutes=5)
# Airflow's tables of runs and their traces; never `dag` or `dag_version` (what is parsed now).
AIRFLOW_TABLES = ("dag_run", "asset_event", "log", "job", "import_error", "xcom", "callback", "trigger")


def report_path(settings: Settings, store: str) -> Path:
    return settings.state / "retention" / f"{store}.json"


def report(settings: Settings, store: str, policy: str, **figures) -> dict:
    """Write what one enforcement did (for `flywheel status`) and return it."""
    done = {"store": store, "policy": policy, "ran_at": datetime.datetime.now(datetime.UTC).isoformat(), **figures}
    path = report_path(settings, store)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, json.dumps(done, indent=1))
    return done


def reports(settings: Settings) -> list[dict]:
    found = []
    for path in sorted((settings.state / "retention").glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def policies(retention: Retention) -> dict[str, str]:
    """Each store's policy in words (for the reports and `flywheel status`)."""
    return {
        "datasets": f"noncurrent upload versions older than {retention.dataset_versions_hours:g} h",
        "models": f"Bentos and model copies beyond the newest {retention.model_versions} per pipeline",
        "airflow": f"run metadata and task logs older than {retention.airflow_hours:g} h",
        "files": (
            f"alerts older than {retention.alerts_hours:g} h, dead letters older than "
            f"{retention.dead_letters_hours:g} h, Nginx's access log rotated past {retention.access_log_mb} MB"
        ),
        "prometheus": f"TSDB {retention.prometheus_time}, at most {retention.prometheus_size}",
        "monitoring": f"the newest {retention.monitoring_runs} drift monitoring runs per pipeline (by monitor_<p>)",
    }


# --- what must stay -------------------------------------------------------------------------------------


def protected_versions(settings: Settings) -> dict[str, set[str]]:
    """Per pipeline, the model versions lineage and serving need: production, previous, what serves."""
    protected: dict[str, set[str]] = {}
    live = {d.pipeline: d.version for d in deployments.all_current(settings)}
    with MlflowAPI.connect(settings) as mlflow:
        for p in pipelines.load_all(settings.pipelines_dir)[0]:
            versions = {mlflow.version_by_alias(p.model_name, a) for a in (schema.PRODUCTION, schema.PREVIOUS)}
            protected[p.name] = {v for v in (*versions, live.get(p.name)) if v}
    for name, version in live.items():
        protected.setdefault(name, set()).add(version)
    return protected


def protected_uploads(settings: Settings, versions: dict[str, set[str]]) -> set[str]:
    """The upload versions (object version ids) the protected model versions were trained on."""
    found = set()
    with MlflowAPI.connect(settings) as mlflow:
        for pipeline, numbers in versions.items():
            for number in numbers:
                upload = schema.upload_from_tags(mlflow.model_version(pipeline, number)["tags"], pipeline)
                if upload and upload.version_id:
                    found.add(upload.version_id)
    return found


# --- the stores -----------------------------------------------------------------------------------------


def datasets(settings: Settings, retention: Retention) -> dict:
    """Versions of uploads replaced (or deleted) longer ago than their age, except those lineage needs;
    then a delete marker left alone. A version's age counts from when a newer one replaced it."""
    keep = protected_uploads(settings, protected_versions(settings))
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=retention.dataset_versions_hours)
    client = objectstore.retention_client(settings)  # its own identity: the platform's cannot delete
    by_key: dict[str, list] = {}
    for obj in client.list_objects(settings.datasets_bucket, recursive=True, include_version=True):
        by_key.setdefault(obj.object_name, []).append(obj)
    deleted = kept = 0
    for key, versions in by_key.items():
        versions.sort(key=lambda o: o.last_modified, reverse=True)  # newest first
        remaining = len(versions)
        for newer, obj in itertools.pairwise(versions):  # each noncurrent one, and what replaced it
            if newer.last_modified > cutoff or obj.version_id in keep:
                kept += 1
                continue
            client.remove_object(settings.datasets_bucket, key, version_id=obj.version_id)
            deleted, remaining = deleted + 1, remaining - 1
        marker = versions[0]
        if remaining == 1 and marker.is_delete_marker and marker.last_modified < cutoff:
            client.remove_object(settings.datasets_bucket, key, version_id=marker.version_id)
            deleted += 1
        else:
            kept += 1
    return report(settings, "datasets", policies(retention)["datasets"], deleted=deleted, kept=kept)


def model_store_plan(settings: Settings, retention: Retention) -> dict[str, dict]:
    """What the prune step keeps per pipeline: the protected versions and how many newest besides."""
    return {
        name: {"keep": sorted(versions), "newest": retention.model_versions}
        for name, versions in protected_versions(settings).items()
    }


def models_report(settings: Settings, retention: Retention, pruned: dict) -> dict:
    return report(settings, "models", policies(retention)["models"], **pruned)


def lineage_floor(settings: Settings, versions: dict[str, set[str]]) -> datetime.datetime | None:
    """The earliest moment the lineage of a protected version starts at (its upload, its training run):
    Airflow's records from then on are kept, whatever the policy says."""
    moments = []
    client = objectstore.client(settings)
    with MlflowAPI.connect(settings) as mlflow:
        for pipeline, numbers in versions.items():
            for number in numbers:
                mv = mlflow.model_version(pipeline, number)
                moments.append(
                    datetime.datetime.fromtimestamp(mlflow.run(mv["run_id"])["info"]["start_time"] / 1000, datetime.UTC)
                )
                upload = schema.upload_from_tags(mv["tags"], pipeline)
                if upload and upload.version_id:
                    try:
                        stat = client.stat_object(upload.bucket, upload.key, version_id=upload.version_id)
                        moments.append(stat.last_modified)
                    except Exception:  # deleted by hand: nothing of it left to keep
                        continue
    return min(moments) - LINEAGE_MARGIN if moments else None


def airflow_database(settings: Settings) -> str:
    """Airflow's metadata database, for `airflow db clean`. A task's own environment names a blocked
    one (Airflow 3 keeps task code off the database), so: compose passes the real one as
    FLYWHEEL_AIRFLOW_DATABASE; embedded mode's is the SQLite file topology gives Airflow."""
    return (
        os.environ.get("FLYWHEEL_AIRFLOW_DATABASE")
        or topology.airflow_env(settings)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    )


def airflow(settings: Settings, retention: Retention, env: dict[str, str]) -> dict:
    """`airflow db clean` of run metadata past its age (never past what a protected version's lineage
    needs), and task log files past their age."""
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=retention.airflow_hours)
    if (floor := lineage_floor(settings, protected_versions(settings))) is not None:
        cutoff = min(cutoff, floor)
    env = {k: v for k, v in env.items() if k != "AIRFLOW__CORE__SQL_ALCHEMY_CONN"}
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = airflow_database(settings)
    cleaned = subprocess.run(
        [
            str(settings.venv_platform / "bin" / "airflow"),
            "db",
            "clean",
            "--clean-before-timestamp",
            cutoff.isoformat(),
            "--tables",
            ",".join(AIRFLOW_TABLES),
            "--skip-archive",
            "--yes",
            "--batch-size",
            "500",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if cleaned.returncode != 0:
        raise RuntimeError(f"airflow db clean exited {cleaned.returncode}: {cleaned.stderr[-500:]}")
    logs = _older_files(settings.logs / "airflow", "*.log", retention.airflow_hours)
    _prune_empty_folders(settings.logs / "airflow")
    return report(
        settings, "airflow", policies(retention)["airflow"], cleaned_before=cutoff.isoformat(), logs_deleted=logs
    )


def files(settings: Settings, retention: Retention) -> dict:
    figures = {
        "alerts_deleted": _older_files(alerts.folder(settings), "*.json", retention.alerts_hours)
        + _older_files(alerts.outbox(settings), "*.json", retention.alerts_hours),
        "dead_letters_deleted": _older_files(DEAD_LETTERS.folder(settings), "*.json", retention.dead_letters_hours),
        "access_log_rotated": rotate_access_log(settings, retention.access_log_mb),
    }
    return report(settings, "files", policies(retention)["files"], **figures)


def rotate_access_log(settings: Settings, megabytes: int) -> bool:
    """Past its size, nginx-access.log is copied to .1 (.1 becomes .2, ...) and emptied in place.

    Copy and truncate rather than rename and reopen (USR1): run as root, Nginx's workers are `nobody`,
    cannot open a path in the private state folder, and would go on writing to the renamed file.
    Nginx appends (O_APPEND), so it writes at the start of the emptied file; lines written between
    the copy and the truncation (an instant) are lost.
    """
    log = settings.logs / "nginx-access.log"
    if not log.exists() or log.stat().st_size < megabytes * 2**20:
        return False
    for i in range(ACCESS_LOGS_KEPT - 1, 0, -1):
        older = log.with_name(f"{log.name}.{i}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{i + 1}"))
    shutil.copyfile(log, log.with_name(f"{log.name}.1"))
    os.truncate(log, 0)
    return True


def _older_files(folder: Path, pattern: str, hours: float) -> int:
    cutoff = time.time() - hours * 3600
    deleted = 0
    for path in folder.rglob(pattern) if folder.exists() else []:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                deleted += 1
        except OSError:
            continue
    return deleted


def _prune_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            continue
