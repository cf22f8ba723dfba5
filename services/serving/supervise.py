"""Serving container: embedded mode's supervisord, narrowed to Nginx, its exporter and the Bentos.

The configuration is flywheel.stack.supervisor_conf itself, minus the programs that run in their
own containers. Its control socket therefore stays where flywheel.stack.supervisor() connects (in
the state folder, a volume shared with the Airflow containers), and flywheel.deploy adds, switches
and removes the `bento-<pipeline>-<colour>` programs here exactly as it does in embedded mode.
"""

from __future__ import annotations

import configparser
import io
import os

from flywheel import stack
from flywheel.settings import Settings

PROGRAMS = ("nginx", "nginx-exporter")  # the topology services this container runs
CONF = "/tmp/supervisord.conf"


def supervisor_conf(settings: Settings) -> str:
    conf = configparser.RawConfigParser(strict=True)
    conf.optionxform = str  # keep keys as written
    conf.read_string(stack.supervisor_conf(settings))
    for section in conf.sections():
        if section.startswith("program:") and section.removeprefix("program:") not in PROGRAMS:
            conf.remove_section(section)
    # The reaper's event listener stays: it kills what a Bento leaves behind here too.
    # The container's main process (under Docker's init): stay in the foreground, log to its stdout,
    # keep the pid file private.
    conf["supervisord"].update(
        nodaemon="true", logfile="/dev/stdout", logfile_maxbytes="0", pidfile="/tmp/supervisord.pid"
    )
    out = io.StringIO()
    conf.write(out)
    return out.getvalue()


def main() -> None:
    with open(CONF, "w") as f:
        f.write(supervisor_conf(Settings.load()))
    os.execvp("supervisord", ["supervisord", "-c", CONF])


if __name__ == "__main__":
    main()
