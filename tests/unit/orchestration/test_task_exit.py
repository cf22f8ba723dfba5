"""A task supervisor's selector hears its task process exit (orchestration/task_exit.py)."""

from __future__ import annotations

import gc
import os
import selectors
import subprocess
import sys
import time
from types import SimpleNamespace

from flywheel.orchestration import task_exit

# Far longer than a child's exit takes: a wait that ends before it was ended by the exit.
LONG = 30.0


class Supervised(SimpleNamespace):
    """What watch_exit uses of Airflow's WatchedSubprocess: the task's pid and the supervisor's selector."""


def test_the_selector_wakes_when_the_task_process_exits_and_the_watch_is_undone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    supervised = Supervised(pid=child.pid, selector=selectors.DefaultSelector())
    exit_ = task_exit.watch_exit(supervised)
    assert exit_ is not None
    started = time.monotonic()
    events = supervised.selector.select(timeout=LONG)
    assert time.monotonic() - started < LONG / 2
    ((key, _),) = events
    handler, on_close = key.data
    assert handler(key.fileobj) is False  # as the supervisor does: nothing more to read, so close it
    on_close(key.fileobj)
    key.fileobj.close()
    assert supervised.selector.get_map() == {}
    child.wait(timeout=10)


def test_the_pidfd_is_closed_with_its_supervisor():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    supervised = Supervised(pid=child.pid, selector=selectors.DefaultSelector())
    fd = task_exit.watch_exit(supervised).fd
    assert os.fstat(fd)
    supervised.selector.close()
    del supervised
    gc.collect()
    child.wait(timeout=10)
    try:
        os.fstat(fd)
    except OSError:
        return
    raise AssertionError(f"fd {fd} still open")


def test_a_gone_process_is_not_watched():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)  # reaped: the pid names no process
    assert task_exit.watch_exit(Supervised(pid=child.pid, selector=selectors.DefaultSelector())) is None


def test_airflows_supervisor_registers_it_with_its_pipes():
    from airflow.sdk.execution_time.supervisor import WatchedSubprocess

    original = WatchedSubprocess._register_pipe_readers
    try:
        task_exit.apply()
        assert WatchedSubprocess._register_pipe_readers.__wrapped__ is original
    finally:
        WatchedSubprocess._register_pipe_readers = original
