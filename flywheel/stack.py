"""Stack: bring the embedded platform up under supervisord, check it, and take it down."""

from __future__ import annotations

import json
import os
import subprocess
import time
import xmlrpc.client
from pathlib import Path

import httpx

from flywheel import routes, topology
from flywheel.settings import Settings

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
        .replace("@BRIDGE@", f"{settings.host_of(settings.ports.bridge)}:{settings.ports.bridge}")
        .replace("@RULES@", str(settings.repo / "services" / "prometheus" / "rules.yml"))
    )


def render(settings: Settings) -> None:
    """Write every generated file into the state folder; deployments already made are kept."""
    s = settings
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
    ):
        (s.state / folder).mkdir(parents=True, exist_ok=True)
    (s.logs / "airflow").mkdir(parents=True, exist_ok=True)
    (s.state / "supervisord.conf").write_text(supervisor_conf(s))
    (s.state / NGINX_DIR / "nginx.conf").write_text(nginx_conf(s))
    routes.sync(s, reload=False)
    (s.state / "prometheus" / "prometheus.yml").write_text(prometheus_conf(s))
    # The simple auth manager reads this file; the password itself lives in .env.
    passwords = s.airflow_home / "passwords.json"
    passwords.write_text(json.dumps({"admin": s.secrets["AIRFLOW_ADMIN_PASSWORD"]}) + "\n")
    passwords.chmod(0o600)


# --- processes -----------------------------------------------------------------------------


def process_env(settings: Settings) -> dict[str, str]:
    """The environment supervisord and every child inherit."""
    s = settings
    path = f"{s.venv_platform / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    return {
        **os.environ,
        **s.client_env(),
        **topology.airflow_env(s),
        "PATH": path,
        "FLYWHEEL_AIRFLOW_PASSWORD": s.secrets["AIRFLOW_ADMIN_PASSWORD"],
    }


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
        env=process_env(settings),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def ensure_buckets(settings: Settings) -> None:
    """Buckets, versioning and the webhook notification: idempotent, run at every `up`."""
    from minio.commonconfig import ENABLED
    from minio.notificationconfig import NotificationConfig, QueueConfig
    from minio.versioningconfig import VersioningConfig

    from flywheel.data import minio_client

    client = minio_client(settings)
    for bucket in (settings.datasets_bucket, settings.mlflow_bucket):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    client.set_bucket_versioning(settings.datasets_bucket, VersioningConfig(ENABLED))
    arn = f"arn:minio:sqs::{topology.WEBHOOK_ID}:webhook"
    client.set_bucket_notification(
        settings.datasets_bucket,
        NotificationConfig(
            queue_config_list=[QueueConfig(queue=arn, events=["s3:ObjectCreated:*"], config_id="flywheel")]
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
