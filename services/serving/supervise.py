"""Serving container: embedded mode's supervisord, narrowed to Nginx, its exporter and the Bentos.

The configuration is flywheel.platform.supervisor's, with only the programs this container runs. Its
control socket therefore stays where flywheel.platform.supervisor connects (in the state folder, a
volume shared with the Airflow containers), and the deploy step adds, switches and removes the
`bento-<pipeline>-<colour>` programs here exactly as it does in embedded mode.
"""

from __future__ import annotations

import os

from flywheel.core.settings import Settings
from flywheel.platform import configs, supervisor

PROGRAMS = ("nginx", "nginx-exporter")  # the topology services this container runs
CONF = "/tmp/supervisord.conf"


def supervisor_conf(settings: Settings) -> str:
    programs = {
        name: section
        for name, section in configs.programs(settings).items()
        if name.removeprefix("program:") in PROGRAMS
    }
    sections = supervisor.main_conf(settings, programs)
    # The reaper's event listener stays: it kills what a Bento leaves behind here too.
    # The container's main process (under Docker's init): stay in the foreground, log to its stdout,
    # keep the pid file private.
    sections["supervisord"].update(
        nodaemon="true", logfile="/dev/stdout", logfile_maxbytes="0", pidfile="/tmp/supervisord.pid"
    )
    return supervisor.render(sections)


def main() -> None:
    with open(CONF, "w") as f:
        f.write(supervisor_conf(Settings.load()))
    os.execvp("supervisord", ["supervisord", "-c", CONF])


if __name__ == "__main__":
    main()
