"""Configs: every file the stack's programs read, rendered into the state folder from the topology.

supervisord's own configuration is platform/supervisor.py's; Nginx's live routes are routes.py's.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
from pathlib import Path

from flywheel.core.settings import MLFLOW_ADMIN_USER, Settings, write_private
from flywheel.platform import provision, routes, supervisor, topology

NGINX_DIR = "nginx"
STATE_FOLDERS = (
    "logs",
    "logs/airflow",
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
)


class ConfigError(ValueError):
    """A setting that cannot be rendered; the message names it."""


def nginx_temp(settings: Settings) -> Path:
    """Where Nginx's workers spool request bodies larger than their pipeline's buffer (images).

    Run as root, Nginx's workers are `nobody`, who cannot enter the private state folder: their spool
    is then a folder of their own under /var/cache/flywheel (root's, so nobody else can plant it),
    one per state folder, mode 700. Otherwise it is in the state folder.
    """
    if os.geteuid() != 0:
        return settings.state / NGINX_DIR / "tmp"
    digest = hashlib.sha256(str(settings.state.resolve()).encode()).hexdigest()[:16]
    return Path("/var/cache/flywheel") / f"nginx-{digest}"


def ensure_nginx_temp(settings: Settings) -> None:
    temp = nginx_temp(settings)
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(temp, nobody.pw_uid, nobody.pw_gid)
        temp.chmod(0o700)


def nginx_conf(settings: Settings) -> str:
    """The front door; routes and upstreams are files routes.sync rewrites while it runs."""
    s = settings
    template = (s.repo / "nginx" / "nginx.conf.template").read_text()
    return (
        template.replace("@STATE@", str(s.state / NGINX_DIR))
        .replace("@TEMP@", str(nginx_temp(s)))
        .replace("@LOGS@", str(s.logs))
        .replace("@HOST@", s.host)
        .replace("@PORT@", str(s.ports.nginx))
        .replace("@STATUS_PORT@", str(s.ports.nginx_status))
        .replace("@USER@", "user nobody nogroup;" if os.geteuid() == 0 else "")
    )


def prometheus_conf(settings: Settings) -> str:
    s = settings

    def at(port: int) -> str:
        return f"{s.host_of(port)}:{port}"

    template = (s.repo / "services" / "prometheus" / "prometheus.yml.template").read_text()
    return (
        template.replace("@TARGETS@", str(s.state / "prometheus" / "targets"))
        .replace("@EXPORTER@", at(s.ports.nginx_exporter))
        .replace("@PROMETHEUS@", at(s.ports.prometheus))
        .replace("@ALERTMANAGER@", at(s.ports.alertmanager))
        .replace("@BRIDGE@", at(s.ports.bridge))
        .replace("@INFERENCE@", at(s.ports.inference))
        .replace("@RULES@", str(s.repo / "services" / "prometheus" / "rules.yml"))
    )


def api_keys_conf(settings: Settings) -> str:
    """Nginx's check of /predict's API keys (FLYWHEEL_API_KEYS): none configured, every caller passes."""
    lines = [
        "# Rendered by flywheel/platform/configs.py from FLYWHEEL_API_KEYS in .env.",
        "map $http_authorization $flywheel_key {",
    ]
    bad = [key for key in settings.api_keys if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,256}", key)]
    if bad:
        raise ConfigError("FLYWHEEL_API_KEYS: each key must be 16-256 characters of letters, digits and ._~+/=-")
    if settings.api_keys:
        lines += ["    default 0;", *(f'    "Bearer {key}" 1;' for key in settings.api_keys)]
    else:
        lines.append("    default 1;")
    return "\n".join([*lines, "}", ""])


def mlflow_auth_ini(settings: Settings) -> str:
    """MLflow's basic-auth app: its users in the state folder, read-only for any login by default.

    The admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment, not
    from this file.
    """
    return "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = sqlite:///{settings.state / 'mlflow' / 'basic_auth.db'}",
            f"admin_username = {MLFLOW_ADMIN_USER}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            # One server process: a login is checked once a minute, not hashed on every request.
            "auth_cache_ttl_seconds = 60",
            "",
        ]
    )


def alertmanager_conf(settings: Settings) -> str:
    """Every alert goes to the events bridge's /alerts, which records it and forwards it to
    FLYWHEEL_ALERT_WEBHOOK (operations/alerts.py): one path for Prometheus' alerts and Airflow's."""
    s = settings
    return "\n".join(
        [
            "# Rendered by flywheel/platform/configs.py.",
            "route:",
            "  receiver: flywheel",
            "  group_by: [alertname, pipeline]",
            "  group_wait: 5s",
            "  group_interval: 30s",
            "  repeat_interval: 4h",
            "receivers:",
            "  - name: flywheel",
            "    webhook_configs:",
            f"      - url: {s.url(s.ports.bridge)}/alerts",
            "        send_resolved: true",
            "        http_config:",
            "          authorization:",
            f"            credentials: {s.secrets['FLYWHEEL_WEBHOOK_TOKEN']}",
            "",
        ]
    )


def programs(settings: Settings) -> supervisor.Sections:
    """Every service of the topology as a supervisord program."""
    sections: supervisor.Sections = {}
    for svc in topology.services(settings):
        sections.update(supervisor.program(settings, svc.name, svc.command, svc.env, svc.priority))
    return sections


def render(settings: Settings) -> None:
    """Write every generated file into the state folder; deployments already made are kept.

    The state folder is its owner's alone (700): MinIO's raw objects, its event queue, the databases
    and every rendered file with a secret in it live there.
    """
    s = settings
    s.state.mkdir(parents=True, exist_ok=True)
    s.state.chmod(0o700)
    for folder in STATE_FOLDERS:
        (s.state / folder).mkdir(parents=True, exist_ok=True)
    supervisor.write_main(s, programs(s))
    ensure_nginx_temp(s)
    (s.state / NGINX_DIR / "nginx.conf").write_text(nginx_conf(s))
    write_private(s.state / NGINX_DIR / "api_keys.conf", api_keys_conf(s))
    routes.sync(s, reload=False)
    (s.state / "prometheus" / "prometheus.yml").write_text(prometheus_conf(s))
    (s.state / "mlflow" / "basic_auth.ini").write_text(mlflow_auth_ini(s))
    s.alertmanager_conf.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(s.alertmanager_conf, alertmanager_conf(s))  # the bridge's token
    provision.airflow_logins(s)  # read by Airflow's api-server when it starts
