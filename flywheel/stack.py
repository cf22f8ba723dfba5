"""Stack: bring the embedded platform up under supervisord, check it, and take it down."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import xmlrpc.client
from pathlib import Path

import httpx

from flywheel import routes, topology
from flywheel.settings import Settings, write_private

NGINX_DIR = "nginx"


class StackError(RuntimeError):
    pass


# --- configuration rendering -------------------------------------------------------------


def supervisor_conf(settings: Settings) -> str:
    s = settings
    sock = s.state / "supervisor.sock"
    lines = [
        "; Rendered by `flywheel up` from flywheel/topology.py: edit that, not this.",
        "[unix_http_server]",
        f"file={sock}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={s.logs / 'supervisord.log'}",
        f"pidfile={s.state / 'supervisord.pid'}",
        f"childlogdir={s.logs}",
        f"directory={s.repo}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{sock}",
        "",
    ]
    for svc in topology.services(s):
        lines += program(s, svc.name, svc.command, svc.env, svc.priority)
    lines += [
        # Kills what a program leaves behind the moment it exits (flywheel/reaper.py).
        "[eventlistener:reaper]",
        f"command={reaper_python(s)} -m flywheel.reaper listen",
        "events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL",
        "autorestart=true",
        f"stderr_logfile={s.logs / 'reaper.log'}",
        "stderr_logfile_maxbytes=5MB",
        "",
        "[include]",
        f"files = {s.state / 'supervisor' / 'conf.d'}/*.conf",
        "",
    ]
    return "\n".join(lines)


def reaper_python(settings: Settings) -> Path:
    # The ML environment's interpreter: the serving container has only that one, and the reaper
    # needs nothing but the standard library and this package.
    return settings.venv_ml / "bin" / "python"


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " ;#") else arg


def program(
    settings: Settings,
    name: str,
    command: list[str],
    env: dict[str, str] | None = None,
    priority: int = 100,
    cpus: str | None = None,
) -> list[str]:
    """A supervisord program; the reaper runs first, so a restart never meets its predecessor's orphans."""
    reaper = [str(reaper_python(settings)), "-m", "flywheel.reaper", "exec", *(["--cpus", cpus] if cpus else []), "--"]
    logs = settings.logs
    lines = [
        f"[program:{name}]",
        "command=" + " ".join(_quote(a) for a in [*reaper, *command]),
        f"priority={priority}",
        "autostart=true",
        "autorestart=true",
        "startsecs=2",
        "startretries=5",
        # Servers that fork workers (uvicorn, bentoml, airflow) must be stopped as a group.
        "stopasgroup=true",
        "killasgroup=true",
        "stopwaitsecs=15",
        "redirect_stderr=true",
        f"stdout_logfile={logs / name}.log",
        "stdout_logfile_maxbytes=20MB",
        "stdout_logfile_backups=2",
    ]
    if env:
        pairs = ",".join(f'{k}="{v}"' for k, v in env.items())
        lines.append(f"environment={pairs}")
    return [*lines, ""]


def nginx_conf(settings: Settings) -> str:
    """The front door; routes and upstreams are files routes.sync rewrites while it runs."""
    s = settings
    template = (s.repo / "nginx" / "nginx.conf.template").read_text()
    return (
        template.replace("@STATE@", str(s.state / NGINX_DIR))
        .replace("@LOGS@", str(s.logs))
        .replace("@HOST@", s.host)
        .replace("@PORT@", str(s.ports.nginx))
        .replace("@STATUS_PORT@", str(s.ports.nginx_status))
        .replace("@DEFAULT@", s.default_pipeline)
        .replace("@USER@", "user nobody nogroup;" if os.geteuid() == 0 else "")
    )


def prometheus_conf(settings: Settings) -> str:
    template = (settings.repo / "services" / "prometheus" / "prometheus.yml.template").read_text()
    return (
        template.replace("@TARGETS@", str(settings.state / "prometheus" / "targets"))
        .replace("@EXPORTER@", f"{settings.host_of(settings.ports.nginx_exporter)}:{settings.ports.nginx_exporter}")
        .replace("@PROMETHEUS@", f"{settings.host_of(settings.ports.prometheus)}:{settings.ports.prometheus}")
        .replace("@ALERTMANAGER@", f"{settings.host_of(settings.ports.alertmanager)}:{settings.ports.alertmanager}")
        .replace("@BRIDGE@", f"{settings.host_of(settings.ports.bridge)}:{settings.ports.bridge}")
        .replace("@RULES@", str(settings.repo / "services" / "prometheus" / "rules.yml"))
    )


def api_keys_conf(settings: Settings) -> str:
    """Nginx's check of /predict's API keys (FLYWHEEL_API_KEYS): none configured, every caller passes."""
    lines = [
        "# Rendered by flywheel/stack.py from FLYWHEEL_API_KEYS in .env.",
        "map $http_authorization $flywheel_key {",
    ]
    bad = [key for key in settings.api_keys if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,256}", key)]
    if bad:
        raise StackError("FLYWHEEL_API_KEYS: each key must be 16-256 characters of letters, digits and ._~+/=-")
    if settings.api_keys:
        lines += ["    default 0;", *(f'    "Bearer {key}" 1;' for key in settings.api_keys)]
    else:
        lines.append("    default 1;")
    return "\n".join([*lines, "}", ""])


def render(settings: Settings) -> None:
    """Write every generated file into the state folder; deployments already made are kept.

    The state folder is its owner's alone (700): MinIO's raw objects, its event queue, the databases
    and every rendered file with a secret in it live there.
    """
    s = settings
    s.state.mkdir(parents=True, exist_ok=True)
    s.state.chmod(0o700)
    for folder in (
        "logs",
        "supervisor/conf.d",
        "minio/data",
        "minio/events-queue",
        "mlflow",
        "airflow",
        "bentoml",
        "nginx/upstreams",
        "nginx/tmp",
        "prometheus/targets",
        "prometheus/data",
        "alertmanager/data",
    ):
        (s.state / folder).mkdir(parents=True, exist_ok=True)
    (s.logs / "airflow").mkdir(parents=True, exist_ok=True)
    write_private(s.state / "supervisord.conf", supervisor_conf(s))  # each program's secrets
    (s.state / NGINX_DIR / "nginx.conf").write_text(nginx_conf(s))
    write_private(s.state / NGINX_DIR / "api_keys.conf", api_keys_conf(s))
    routes.sync(s, reload=False)
    (s.state / "prometheus" / "prometheus.yml").write_text(prometheus_conf(s))
    (s.state / "mlflow" / "basic_auth.ini").write_text(topology.mlflow_auth_ini(s))
    write_private(s.state / "alertmanager" / "alertmanager.yml", topology.alertmanager_conf(s))  # the bridge's token
    # The simple auth manager reads this file; the password itself lives in .env.
    write_private(s.airflow_home / "passwords.json", json.dumps({"admin": s.secrets["AIRFLOW_ADMIN_PASSWORD"]}) + "\n")


# --- processes -----------------------------------------------------------------------------


def process_env(settings: Settings) -> dict[str, str]:
    """The environment supervisord and every child inherit: where things are, no secret. Each
    program's own secrets are in its `environment` (topology.py), in a file only its user reads."""
    s = settings
    path = f"{s.venv_platform / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    return {**os.environ, **s.serving_env(), "PATH": path}


def supervisor(settings: Settings):
    """An XML-RPC proxy to supervisord over its unix socket."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{settings.state / 'supervisor.sock'}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def supervisord_running(settings: Settings) -> bool:
    try:
        return supervisor(settings).getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Fault):
        return False


def migrate_airflow(settings: Settings) -> None:
    subprocess.run(
        [str(settings.venv_platform / "bin" / "airflow"), "db", "migrate"],
        env={**process_env(settings), **topology.airflow_env(settings)},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


UPLOAD_EVENTS = [
    "s3:ObjectCreated:Put",
    "s3:ObjectCreated:Post",
    "s3:ObjectCreated:Copy",
    "s3:ObjectCreated:CompleteMultipartUpload",
]


def ensure_mlflow_accounts(settings: Settings) -> None:
    """MLflow's service account for the platform, with rights on every experiment and model: idempotent.

    The server's basic-auth app creates the `admin` login (for people) from MLFLOW_AUTH_ADMIN_PASSWORD.
    """
    from flywheel.settings import MLFLOW_ADMIN_USER, MLFLOW_SERVICE_USER

    auth = (MLFLOW_ADMIN_USER, settings.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    with httpx.Client(base_url=settings.mlflow_url, auth=auth, timeout=30) as mlflow:
        user = {"username": MLFLOW_SERVICE_USER, "password": settings.secrets["MLFLOW_TRACKING_PASSWORD"]}
        r = mlflow.post("/api/2.0/mlflow/users/create", json=user)
        if r.status_code >= 300 and "already exists" not in r.text.lower():
            raise StackError(f"MLflow did not create its service account: HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code >= 300:  # keep it in step with .env
            r = mlflow.patch("/api/2.0/mlflow/users/update-password", json=user)
            if r.status_code >= 300:
                raise StackError(f"MLflow kept the service account's old password: HTTP {r.status_code}")
        for resource in ("experiment", "registered_model"):
            grant = {
                "username": MLFLOW_SERVICE_USER,
                "resource_type": resource,
                "resource_id": "*",
                "permission": "MANAGE",
            }
            r = mlflow.post("/api/3.0/mlflow/users/permissions/grant", json=grant)
            if r.status_code >= 300 and "exist" not in r.text.lower():
                raise StackError(f"MLflow refused the service account's rights: HTTP {r.status_code}: {r.text[:200]}")


def ml_policy(settings: Settings) -> dict:
    """What the platform's MinIO identity may do: read datasets, read and write MLflow's artifacts."""
    datasets, artifacts = settings.datasets_bucket, settings.mlflow_bucket
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [f"arn:aws:s3:::{datasets}"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [f"arn:aws:s3:::{datasets}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:*"],
                "Resource": [f"arn:aws:s3:::{artifacts}", f"arn:aws:s3:::{artifacts}/*"],
            },
        ],
    }


def ensure_buckets(settings: Settings) -> None:
    """Buckets, versioning, the webhook notification and the platform's own MinIO identity (with
    only the rights it needs): idempotent, run at every `up`."""
    from minio import MinioAdmin
    from minio.commonconfig import ENABLED
    from minio.credentials import StaticProvider
    from minio.error import MinioAdminException
    from minio.notificationconfig import NotificationConfig, QueueConfig
    from minio.versioningconfig import VersioningConfig

    from flywheel.data import minio_client
    from flywheel.settings import ML_ACCESS_KEY

    root = settings.secrets["MINIO_ROOT_USER"], settings.secrets["MINIO_ROOT_PASSWORD"]
    admin = MinioAdmin(endpoint=settings.minio_endpoint, credentials=StaticProvider(*root), secure=False)
    admin.policy_add(ML_ACCESS_KEY, policy=ml_policy(settings))
    admin.user_add(ML_ACCESS_KEY, settings.secrets["FLYWHEEL_ML_SECRET_KEY"])
    with contextlib.suppress(MinioAdminException):  # attached at an earlier `up`
        admin.attach_policy([ML_ACCESS_KEY], user=ML_ACCESS_KEY)
    client = minio_client(settings, root=True)
    for bucket in (settings.datasets_bucket, settings.mlflow_bucket):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    client.set_bucket_versioning(settings.datasets_bucket, VersioningConfig(ENABLED))
    arn = f"arn:minio:sqs::{topology.WEBHOOK_ID}:webhook"
    client.set_bucket_notification(
        settings.datasets_bucket,
        NotificationConfig(
            # New objects only: tagging an object (s3:ObjectCreated:PutTagging) is no upload.
            queue_config_list=[QueueConfig(queue=arn, events=UPLOAD_EVENTS, config_id="flywheel")]
        ),
    )


def wait_healthy(url: str, timeout: float, name: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code < 300:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise StackError(f"{name or url} not healthy after {timeout:.0f}s ({last}); see {url}")


def up(settings: Settings, progress=print, timeout: float = 180) -> None:
    s = settings
    render(s)
    if not s.minio_binary.exists():
        raise StackError(f"MinIO binary missing at {s.minio_binary}: run `make install` first")
    progress("migrating Airflow's database")
    migrate_airflow(s)
    if supervisord_running(s):
        progress("supervisord already running: reloading its configuration")
        supervisor(s).reloadConfig()
        subprocess.run(
            [str(s.venv_platform / "bin" / "supervisorctl"), "-c", str(s.state / "supervisord.conf"), "update"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        routes.reload_nginx(s)  # routes and API keys as rendered now
    else:
        if leftovers := sweep(s, _supervisord_pid(s)):
            progress(f"killed {len(leftovers)} processes a dead supervisord left behind")
        progress("starting supervisord")
        subprocess.run(
            [str(s.venv_platform / "bin" / "supervisord"), "-c", str(s.state / "supervisord.conf")],
            env=process_env(s),
            check=True,
        )
    svcs = {svc.name: svc for svc in topology.services(s)}
    wait_healthy(svcs["minio"].health, timeout, "minio")
    ensure_buckets(s)
    for svc in svcs.values():
        if svc.health:
            wait_healthy(svc.health, timeout, svc.name)
            progress(f"  {svc.name:<22} healthy")
        if svc.name == "mlflow":
            ensure_mlflow_accounts(s)
    # Processes without an HTTP health check must at least be RUNNING.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {p["name"]: p["statename"] for p in supervisor(s).getAllProcessInfo()}
        waiting = [n for n, state in states.items() if state != "RUNNING" and not n.startswith("bento-")]
        if not waiting:
            break
        time.sleep(0.5)
    else:
        raise StackError(f"not running after {timeout:.0f}s: {', '.join(waiting)}")


def down(settings: Settings, timeout: float = 60) -> bool:
    """Stop every process supervisord runs, then supervisord itself, then anything left behind.

    False if nothing was running.
    """
    running = supervisord_running(settings)
    pid = _supervisord_pid(settings)
    if running:
        supervisor(settings).shutdown()
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise StackError(f"supervisord (pid {pid}) still running after {timeout:.0f}s")
            time.sleep(0.2)
    return bool(sweep(settings, pid)) or running


def sweep(settings: Settings, supervisord_pid: int | None = None) -> list[int]:
    """Kill every process of this stack that supervisord no longer runs (flywheel/reaper.py).

    After `down`, or a `kill -9` of supervisord itself, that is every process of the stack.
    """
    from flywheel import reaper

    if _alive(supervisord_pid) and b"supervisord" not in Path(f"/proc/{supervisord_pid}/cmdline").read_bytes():
        supervisord_pid = None  # a stale pid file, its number taken by another process: not our session
    return reaper.reap(f"unix://{settings.state / 'supervisor.sock'}", supervisord_pid or -1)


def _supervisord_pid(settings: Settings) -> int | None:
    try:
        return int((settings.state / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def status(settings: Settings) -> list[dict]:
    """One row per process: supervisor's state, pid, uptime, and its endpoint's health."""
    from flywheel import deploy

    if not supervisord_running(settings):
        return []
    health = {svc.name: svc.health for svc in topology.services(settings)}
    for d in deploy.all_current(settings):
        for i, port in enumerate(d.ports):
            health[deploy.replica_name(d.pipeline, d.colour, i)] = f"{settings.url(port)}/readyz"
    rows = []
    for info in supervisor(settings).getAllProcessInfo():
        url = health.get(info["name"])
        ok = None
        if url:
            try:
                ok = httpx.get(url, timeout=2).status_code < 300
            except httpx.HTTPError:
                ok = False
        rows.append(
            {
                "name": info["name"],
                "state": info["statename"],
                "pid": info["pid"],
                "uptime": info["description"],
                "endpoint": url,
                "healthy": ok,
            }
        )
    return rows
