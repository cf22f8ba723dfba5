"""Topology: every long-running service of the platform, written once for both modes.

Embedded mode renders these into supervisord programs; the compose parity test reads the same
list, so a service, port or command that changes here and not in docker-compose.yml fails it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from flywheel.core.settings import AIRFLOW_USERS, Settings

WEBHOOK_ID = "FLYWHEEL"  # MinIO's notification target id: arn:minio:sqs::FLYWHEEL:webhook (provision.py)
WEBHOOK_FAST_ID = "FLYWHEELFAST"  # the same without a queue dir: sent at once, dropped if not taken
WEBHOOK_IDS = (WEBHOOK_ID, WEBHOOK_FAST_ID)


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    health: str | None  # an HTTP URL answering 2xx once the service is ready
    env: dict[str, str] = field(default_factory=dict)
    priority: int = 100  # supervisord starts lower numbers first


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    return found or name


def minio_env(settings: Settings) -> dict[str, str]:
    s = settings
    env = {
        "MINIO_ROOT_USER": s.secrets["MINIO_ROOT_USER"],
        "MINIO_ROOT_PASSWORD": s.secrets["MINIO_ROOT_PASSWORD"],
        "MINIO_BROWSER_REDIRECT_URL": s.url(s.ports.minio_console),
    }
    # Two targets, both the bridge (orchestration/deliveries.py): one sends at once, the other keeps
    # every event on disk whenever the bridge or Airflow is down (nothing is lost) and replays it.
    for target in WEBHOOK_IDS:
        prefix = f"MINIO_NOTIFY_WEBHOOK_{{}}_{target}"
        env[prefix.format("ENABLE")] = "on"
        env[prefix.format("ENDPOINT")] = f"{s.url(s.ports.bridge)}/minio/events"
        env[prefix.format("AUTH_TOKEN")] = s.secrets["FLYWHEEL_WEBHOOK_TOKEN"]
    env[f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{WEBHOOK_ID}"] = str(s.state / "minio" / "events-queue")
    return env


def airflow_env(settings: Settings) -> dict[str, str]:
    s = settings
    home = s.airflow_home
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(s.repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Sized for 2 cores: training runs in its own process; Airflow only waits on it.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u.name}:{u.role}" for u in AIRFLOW_USERS),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(s.airflow_passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.airflow_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": s.host,
        "AIRFLOW__API__PORT": str(s.ports.airflow),
        "AIRFLOW__API__BASE_URL": s.airflow_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": s.secrets["AIRFLOW__API_AUTH__JWT_SECRET"],
        "AIRFLOW__API__SECRET_KEY": s.secrets["AIRFLOW__API__SECRET_KEY"],
        "AIRFLOW__CORE__FERNET_KEY": s.secrets["AIRFLOW__CORE__FERNET_KEY"],
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": s.host,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(s.ports.airflow_scheduler_health),
        # A task whose scheduler died (kill -9) is reset and retried within a minute, not Airflow's
        # default five: a scheduler silent for 20 s is dead, and its tasks are looked for every 15 s.
        # A task whose supervisor stopped heartbeating (every 5 s) is failed after 40 s.
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "20",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "40",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # On 2 cores a training process can starve the API server for a while: be patient with it.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(s.logs / "airflow"),
    }


AIRFLOW_MAIN = "flywheel.orchestration.airflow_main"
STEP_SERVER = "flywheel.orchestration.stepserver"


def services(settings: Settings) -> list[Service]:
    s = settings
    p = s.ports
    platform_bin = s.venv_platform / "bin"
    ml_bin = s.venv_ml / "bin"
    # Airflow's own CLI, behind a wrapper that applies upstream fixes first (orchestration/airflow_main.py).
    airflow = [str(platform_bin / "python"), "-m", AIRFLOW_MAIN]
    # Airflow's own settings and secrets, and what its tasks need to reach MinIO and MLflow.
    airflow_service_env = {**airflow_env(s), **s.client_env()}
    return [
        Service(
            "minio",
            [
                str(s.minio_binary),
                "server",
                str(s.state / "minio" / "data"),
                "--address",
                f"{s.host}:{p.minio}",
                "--console-address",
                f"{s.host}:{p.minio_console}",
                "--quiet",
            ],
            f"{s.url(p.minio)}/minio/health/live",
            minio_env(s),
            priority=10,
        ),
        Service(
            "mlflow",
            [
                str(ml_bin / "mlflow"),
                "server",
                # Nobody changes runs, models or the `production` alias without a login.
                "--app-name",
                "basic-auth",
                "--backend-store-uri",
                f"sqlite:///{s.state / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{s.mlflow_bucket}/",
                "--serve-artifacts",
                "--host",
                s.host,
                "--port",
                str(p.mlflow),
                "--workers",
                "1",
            ],
            f"{s.mlflow_url}/health",
            {
                # The server stores artifacts as the platform's MinIO identity; it logs nobody in.
                **{
                    k: v
                    for k, v in s.client_env().items()
                    if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
                },
                # MLflow 3's job runner spawns several Huey consumers (~225 MB each) we do not use.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_AUTH_CONFIG_PATH": str(s.state / "mlflow" / "basic_auth.ini"),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": s.secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                "MLFLOW_AUTH_ADMIN_PASSWORD": s.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
            },
            priority=20,
        ),
        Service(
            "airflow-api-server",
            [*airflow, "api-server", "--host", s.host, "--port", str(p.airflow), "--workers", "1"],
            f"{s.airflow_url}/api/v2/monitor/health",
            airflow_service_env,
            priority=30,
        ),
        # No log servers (they bind every interface, and no setting moves them): the api-server reads
        # task logs from the log folder both share.
        Service(
            "airflow-scheduler",
            [*airflow, "scheduler", "--skip-serve-logs"],
            f"{s.url(p.airflow_scheduler_health)}/health",
            airflow_service_env,
            priority=40,
        ),
        Service("airflow-dag-processor", [*airflow, "dag-processor"], None, airflow_service_env, priority=40),
        Service(
            "airflow-triggerer", [*airflow, "triggerer", "--skip-serve-logs"], None, airflow_service_env, priority=40
        ),
        # The ML environment, warm: each step of a task is a process it forks, with the task's
        # environment; it holds no secret of its own (orchestration/stepserver.py).
        Service(
            "step-server",
            [str(ml_bin / "python"), "-m", STEP_SERVER, "--socket", str(s.step_socket)],
            None,
            priority=45,
        ),
        Service(
            "events-bridge",
            [
                str(platform_bin / "uvicorn"),
                "app:app",
                "--app-dir",
                str(s.repo / "services" / "events_bridge"),
                "--host",
                s.host,
                "--port",
                str(p.bridge),
                "--log-level",
                "info",
            ],
            f"{s.url(p.bridge)}/health",
            s.client_env(),
            priority=50,
        ),
        # What the Bentos answered and the feedback on it: their spool into SQLite and MinIO, live
        # scores out (services/inference/app.py). The ML environment: pyarrow writes the Parquet.
        Service(
            "inference",
            [
                str(ml_bin / "uvicorn"),
                "app:app",
                "--app-dir",
                str(s.repo / "services" / "inference"),
                "--host",
                s.host,
                "--port",
                str(p.inference),
                "--log-level",
                "warning",
            ],
            f"{s.inference_url}/health",
            # The platform's MinIO identity (it writes s3://inference), and no other secret.
            {**s.serving_env(), "FLYWHEEL_ML_SECRET_KEY": s.secrets["FLYWHEEL_ML_SECRET_KEY"]},
            priority=55,
        ),
        Service(
            "nginx",
            [binary("nginx"), "-c", str(s.state / "nginx" / "nginx.conf")],
            f"{s.predict_url}/health",
            priority=60,
        ),
        Service(
            "nginx-exporter",
            [
                binary("prometheus-nginx-exporter"),
                f"-nginx.scrape-uri={s.url(p.nginx_status)}/stub_status",
                f"-web.listen-address={s.host}:{p.nginx_exporter}",
            ],
            f"{s.url(p.nginx_exporter)}/metrics",
            priority=70,
        ),
        Service(
            "prometheus",
            [
                binary("prometheus"),
                f"--config.file={s.state / 'prometheus' / 'prometheus.yml'}",
                f"--storage.tsdb.path={s.state / 'prometheus' / 'data'}",
                f"--storage.tsdb.retention.time={s.retention.prometheus_time}",
                f"--storage.tsdb.retention.size={s.retention.prometheus_size}",
                f"--web.listen-address={s.host}:{p.prometheus}",
            ],
            f"{s.prometheus_url}/-/ready",
            priority=70,
        ),
        Service(
            "alertmanager",
            [
                binary("prometheus-alertmanager"),
                f"--config.file={s.alertmanager_conf}",
                f"--storage.path={s.state / 'alertmanager' / 'data'}",
                f"--web.listen-address={s.host}:{p.alertmanager}",
                "--cluster.listen-address=",  # no gossip port (it would bind every interface)
            ],
            f"{s.url(p.alertmanager)}/-/ready",
            priority=70,
        ),
    ]
