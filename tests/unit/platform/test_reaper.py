"""The reaper's rule: a process of the stack that no longer descends from supervisord is an orphan."""

import os
import subprocess
import sys
import time

from flywheel.platform import reaper
from flywheel.platform.reaper import Proc

URL = "unix:///state/supervisor.sock"


def procs(*entries: Proc) -> dict[int, Proc]:
    return {p.pid: p for p in entries}


TABLE = procs(
    Proc(100, 1, 100, False, None),  # supervisord: leads its session
    Proc(101, 100, 100, False, URL),  # a program
    Proc(102, 101, 100, False, None),  # its child, environment overwritten by setproctitle
    Proc(103, 1, 100, False, None),  # the child of a killed program: still in the session
    Proc(104, 1, 104, False, URL),  # a process in a session of its own, its parent killed
    Proc(105, 1, 5, False, "unix:///other/supervisor.sock"),  # another stack's
    Proc(106, 1, 100, True, URL),  # a zombie holds nothing
    Proc(107, 1, 7, False, None),  # unrelated
)


def test_orphans_are_marked_processes_no_longer_descended_from_supervisord():
    assert reaper.orphans(URL, 100, TABLE) == [103, 104]


def test_once_supervisord_is_dead_every_marked_process_is_an_orphan():
    table = {k: v for k, v in TABLE.items() if k != 100}
    table[101] = Proc(101, 1, 100, False, URL)  # the kernel gave supervisord's children to init
    assert reaper.orphans(URL, 100, table) == [101, 102, 103, 104]


def test_without_a_session_only_the_environment_marks():
    assert reaper.orphans(URL, -1, TABLE) == [101, 104]


def test_the_real_process_table_is_read_with_sessions_and_environments():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        env={**os.environ, "SUPERVISOR_SERVER_URL": "unix:///test/reaper.sock"},
        start_new_session=True,
    )
    try:
        time.sleep(0.2)
        me = reaper.snapshot()[child.pid]
        assert me.server_url == "unix:///test/reaper.sock" and me.sid == child.pid and me.ppid == os.getpid()
        # Our child descends from us: with us as "supervisord" it is no orphan; with another, it is.
        assert child.pid not in reaper.orphans("unix:///test/reaper.sock", os.getpid())
        assert reaper.orphans("unix:///test/reaper.sock", -1) == [child.pid]
        assert reaper.kill([child.pid]) == []
    finally:
        child.kill()
        child.wait()
