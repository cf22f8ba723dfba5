"""supervisord's configuration, as data: the only writer of it, and the calls that change what runs.

Sections are dicts rendered with configparser; values are escaped the way supervisord reads them
back (its `%(name)s` expansion, `shlex` for a command, quoted `KEY="value"` pairs for an environment),
so a `%`, a space or a quote in a path, a URL or a secret arrives as written.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import shlex
import xmlrpc.client
from pathlib import Path

from flywheel.clients import supervisord
from flywheel.core.settings import Settings, write_private

Sections = dict[str, dict[str, str]]


class ConfigError(ValueError):
    """A value supervisord could not read back as written."""


def _escape(value: str) -> str:
    return value.replace("%", "%%")  # supervisord expands %(name)s in every value


def logfile_value(path) -> str:
    # supervisord expands a program's log file name twice (once reading it, once per process).
    return _escape(_escape(str(path)))


def command_value(command: list[str]) -> str:
    return _escape(shlex.join(command))


def environment_value(env: dict[str, str]) -> str:
    """KEY="value",... as supervisord parses it: shlex without escapes (a quote ends the value), then
    quotes stripped from both ends of each value."""
    pairs = []
    for key, value in env.items():
        if not key.replace("_", "").isalnum():
            raise ConfigError(f"environment name {key!r} is not a plain identifier")
        if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
            raise ConfigError(f"the value of {key} starts or ends with a quote: supervisord would strip it")
        if '"' not in value:
            quoted = f'"{value}"'
        elif "'" not in value:
            quoted = f"'{value}'"
        else:
            raise ConfigError(f"the value of {key} holds both kinds of quote: supervisord cannot read it back")
        pairs.append(f"{key}={quoted}")
    return _escape(",".join(pairs))


def reaper_python(settings: Settings) -> Path:
    # The ML environment's interpreter: the serving container has only that one, and the reaper
    # needs nothing but the standard library and this package.
    return settings.venv_ml / "bin" / "python"


def program(
    settings: Settings,
    name: str,
    command: list[str],
    env: dict[str, str] | None = None,
    priority: int = 100,
    cpus: str | None = None,
) -> Sections:
    """A supervisord program; the reaper runs first, so a restart never meets its predecessor's orphans."""
    reaper = [str(reaper_python(settings)), "-m", "flywheel.platform.reaper", "exec"]
    reaper += [*(["--cpus", cpus] if cpus else []), "--"]
    section = {
        "command": command_value([*reaper, *command]),
        "priority": str(priority),
        "autostart": "true",
        "autorestart": "true",
        "startsecs": "2",
        "startretries": "5",
        # Servers that fork workers (uvicorn, bentoml, airflow) must be stopped as a group.
        "stopasgroup": "true",
        "killasgroup": "true",
        "stopwaitsecs": "15",
        "redirect_stderr": "true",
        "stdout_logfile": logfile_value(settings.logs / f"{name}.log"),
        "stdout_logfile_maxbytes": "20MB",
        "stdout_logfile_backups": "2",
    }
    if env:
        section["environment"] = environment_value(env)
    return {f"program:{name}": section}


def group(name: str, programs: list[str]) -> Sections:
    return {f"group:{name}": {"programs": ",".join(programs)}}


def render(sections: Sections, header: str = "") -> str:
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # keys as written
    for name, values in sections.items():
        parser[name] = values
    out = io.StringIO()
    if header:
        out.write("".join(f"; {line}\n" for line in header.splitlines()))
    parser.write(out)
    return out.getvalue()


def parse(text: str) -> Sections:
    parser = configparser.RawConfigParser(strict=True)
    parser.optionxform = str
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}


def main_conf(settings: Settings, programs: Sections) -> Sections:
    """supervisord itself, its socket, the reaper's event listener, the include of the deploy step's groups."""
    s = settings
    sock = s.state / "supervisor.sock"
    return {
        "unix_http_server": {"file": _escape(str(sock)), "chmod": "0700"},
        "supervisord": {
            "logfile": _escape(str(s.logs / "supervisord.log")),
            "pidfile": _escape(str(s.state / "supervisord.pid")),
            "childlogdir": _escape(str(s.logs)),
            "directory": _escape(str(s.repo)),
        },
        "rpcinterface:supervisor": {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        },
        "supervisorctl": {"serverurl": _escape(f"unix://{sock}")},
        **programs,
        # Kills what a program leaves behind the moment it exits (flywheel/platform/reaper.py).
        "eventlistener:reaper": {
            "command": command_value([str(reaper_python(s)), "-m", "flywheel.platform.reaper", "listen"]),
            "events": "PROCESS_STATE_EXITED,PROCESS_STATE_FATAL",
            "autorestart": "true",
            "stderr_logfile": logfile_value(s.logs / "reaper.log"),
            "stderr_logfile_maxbytes": "5MB",
        },
        "include": {"files": _escape(f"{groups_dir(s)}/*.conf")},
    }


def groups_dir(settings: Settings) -> Path:
    return settings.state / "supervisor" / "conf.d"


def conf_path(settings: Settings) -> Path:
    return settings.state / "supervisord.conf"


def write_main(settings: Settings, programs: Sections) -> None:
    # Private: each program's secrets are in its environment.
    text = render(main_conf(settings, programs), "Rendered by flywheel/platform/stack.py: edit the topology, not this.")
    write_private(conf_path(settings), text)


# --- a running supervisord ----------------------------------------------------------------------------


def rpc(settings: Settings):
    return supervisord.connect(settings.state / "supervisor.sock")


def running(settings: Settings) -> bool:
    return supervisord.running(settings.state / "supervisor.sock")


def add_group(settings: Settings, name: str, sections: Sections) -> None:
    """Write a group's programs into conf.d and start them together."""
    write_private(groups_dir(settings) / f"{name}.conf", render(sections, "Written by the deploy step."))
    sup = rpc(settings)
    sup.reloadConfig()
    sup.addProcessGroup(name)


def remove_group(settings: Settings, name: str) -> None:
    """Stop a group's programs (and whatever they started), forget them, delete their file."""
    sup = rpc(settings)
    if name in {p["group"] for p in sup.getAllProcessInfo()}:
        with contextlib.suppress(xmlrpc.client.Fault):  # already stopped
            sup.stopProcessGroup(name, True)
        sup.removeProcessGroup(name)
    (groups_dir(settings) / f"{name}.conf").unlink(missing_ok=True)


def signal(settings: Settings, name: str, signame: str) -> None:
    """Signal a program; nothing if supervisord is not running."""
    with contextlib.suppress(OSError, xmlrpc.client.Fault):
        rpc(settings).signalProcess(name, signame)


def cpus_for(replica: int) -> str:
    """Replicas spread over the cores: replica i on core i mod n."""
    cores = sorted(os.sched_getaffinity(0))
    return str(cores[replica % len(cores)])
