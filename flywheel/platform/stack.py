"""Stack: bring the embedded platform up under supervisord, check it, and take it down."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from flywheel.core.settings import Settings
from flywheel.core.waiting import WaitTimeout, wait_until
from flywheel.platform import configs, deployments, provision, reaper, routes, supervisor, topology


class StackError(RuntimeError):
    pass


def process_env(settings: Settings) -> dict[str, str]:
    """The environment supervisord and every child inherit: where things are, no secret. Each
    program's own secrets are in its `environment` (topology.py), in a file only its user reads."""
    s = settings
    path = f"{s.venv_platform / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    return {**os.environ, **s.serving_env(), "PATH": path}


def migrate_airflow(settings: Settings) -> None:
    subprocess.run(
        [str(settings.venv_platform / "bin" / "airflow"), "db", "migrate"],
        env={**process_env(settings), **topology.airflow_env(settings)},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 300
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout: float, name: str = "", interval: float = 0.5) -> None:
    """Until `url` answers 2xx; StackError naming the service after `timeout`."""
    try:
        wait_until(lambda: healthy(url), timeout, f"{name or url} healthy (see {url})", interval=interval)
    except WaitTimeout as exc:
        raise StackError(str(exc)) from exc


def up(settings: Settings, progress=print, timeout: float = 180) -> None:
    s = settings
    configs.render(s)
    if not s.minio_binary.exists():
        raise StackError(f"MinIO binary missing at {s.minio_binary}: run `make install` first")
    progress("migrating Airflow's database")
    migrate_airflow(s)
    if supervisor.running(s):
        progress("supervisord already running: reloading its configuration")
        supervisor.rpc(s).reloadConfig()
        subprocess.run(
            [str(s.venv_platform / "bin" / "supervisorctl"), "-c", str(supervisor.conf_path(s)), "update"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        routes.reload_nginx(s)  # routes and API keys as rendered now
    else:
        if leftovers := sweep(s, _supervisord_pid(s)):
            progress(f"killed {len(leftovers)} processes a dead supervisord left behind")
        progress("starting supervisord")
        subprocess.run(
            [str(s.venv_platform / "bin" / "supervisord"), "-c", str(supervisor.conf_path(s))],
            env=process_env(s),
            check=True,
        )
    svcs = {svc.name: svc for svc in topology.services(s)}
    wait_healthy(svcs["minio"].health, timeout, "minio")
    provision.buckets(s)
    for svc in svcs.values():
        if svc.health:
            wait_healthy(svc.health, timeout, svc.name)
            progress(f"  {svc.name:<22} healthy")
        if svc.name == "mlflow":
            provision.mlflow_accounts(s)

    def waiting() -> list[str]:
        states = {p["name"]: p["statename"] for p in supervisor.rpc(s).getAllProcessInfo()}
        return [n for n, state in states.items() if state != "RUNNING" and not n.startswith("bento-")]

    # Processes without an HTTP health check must at least be RUNNING.
    try:
        wait_until(lambda: not waiting(), timeout, "every program RUNNING", describe=lambda: ", ".join(waiting()))
    except WaitTimeout as exc:
        raise StackError(str(exc)) from exc


def down(settings: Settings, timeout: float = 60) -> bool:
    """Stop every process supervisord runs, then supervisord itself, then anything left behind.

    False if nothing was running.
    """
    running = supervisor.running(settings)
    pid = _supervisord_pid(settings)
    if running:
        supervisor.rpc(settings).shutdown()
        try:
            wait_until(lambda: not _alive(pid), timeout, f"supervisord (pid {pid}) stopped", interval=0.2)
        except WaitTimeout as exc:
            raise StackError(str(exc)) from exc
    return bool(sweep(settings, pid)) or running


def sweep(settings: Settings, supervisord_pid: int | None = None) -> list[int]:
    """Kill every process of this stack that supervisord no longer runs (platform/reaper.py).

    After `down`, or a `kill -9` of supervisord itself, that is every process of the stack.
    """
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
    if not supervisor.running(settings):
        return []
    health = {svc.name: svc.health for svc in topology.services(settings)}
    for d in deployments.all_current(settings):
        for i, port in enumerate(d.ports):
            health[deployments.replica_name(d.pipeline, d.colour, i)] = f"{settings.url(port)}/readyz"
    rows = []
    for info in supervisor.rpc(settings).getAllProcessInfo():
        url = health.get(info["name"])
        rows.append(
            {
                "name": info["name"],
                "state": info["statename"],
                "pid": info["pid"],
                "uptime": info["description"],
                "endpoint": url,
                "healthy": healthy(url) if url else None,
            }
        )
    return rows
