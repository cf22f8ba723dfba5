"""Airflow's scheduler on SQLite (embedded mode) acts on a change when it happens, not at its next tick.

Two things made every hop of an upload's runs wait for the scheduler's next loop, which an idle
scheduler starts once a second (`scheduler_idle_sleep_time`):

- **Its idle sleep hears nothing.** A task's end, an asset event or a new run is a commit by another
  process (the API server, for the task runner and the events bridge), but the scheduler only sees it
  after sleeping the rest of its second: 0.4-0.6 s before each task, at the median (docs/measurements.md).
  Here the sleep also ends when another process commits to the database: SQLite in WAL mode appends
  every commit to `<database>-wal`, and the kernel's inotify says so. Writes made while a loop ran
  (its own, or another process's that it may have missed) buy one more loop at once, never two in a
  row, so the scheduler cannot keep itself awake; what wakes an idle stack is the other processes'
  heartbeats (about one a second). A sleep is never longer than Airflow's.
- **`now()` is whole seconds.** SQLAlchemy writes `func.now()` as CURRENT_TIMESTAMP on SQLite, which
  has no fraction, so Airflow's `run_after <= now()` holds a run created at 12:00:00.3 queued until
  12:01 has passed: 1.1 s for each deploy run. Here it is STRFTIME's millisecond clock, in the format
  SQLAlchemy stores datetimes in on SQLite.

Both apply to the scheduler only, and only where its database is SQLite; on Postgres (compose mode)
`now()` is precise already. inotify through ctypes: watchfiles (in the lock for uvicorn) watches in a
Rust thread that swallows a signal's exception, so a SIGTERM during the sleep would not stop the
scheduler, while `select` here is interrupted exactly as `time.sleep` is.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from pathlib import Path

IN_MODIFY = 0x2
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class DatabaseWrites:
    """Sleeps that end early when a file of the database changes (inotify on its folder)."""

    def __init__(self, database: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(database.parent), IN_MODIFY) < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"inotify_add_watch {database.parent}")
        # The WAL takes every commit; the database file itself changes when a checkpoint copies it back.
        self.names = {os.fsencode(database.name), os.fsencode(database.name + "-wal")}
        self.skipped = False  # whether the last sleep was skipped for writes during the loop

    def changed(self) -> bool:
        """Whether the database changed since the last look (reads every pending event)."""
        seen = False
        while True:
            try:
                buffer = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(buffer):
                _, _, _, length = _EVENT.unpack_from(buffer, offset)
                start = offset + _EVENT.size
                seen = seen or buffer[start : start + length].rstrip(b"\0") in self.names
                offset = start + length

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if another process writes the database meanwhile.

        A write during the loop just ended may be another process's, landed after the loop read the
        database (a task's end commits a burst, and its first write woke the loop), or the loop's own:
        once, the sleep is skipped so that another loop reads it; the next sleep forgets such writes,
        so a loop that writes on every pass cannot keep the scheduler from sleeping."""
        if self.changed() and not self.skipped:
            self.skipped = True
            return
        self.skipped = False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and self.changed():
                return


def quick_scheduler() -> bool:
    """Whether the scheduler gets Flywheel's changes (these and airflow_main's preload): the default."""
    from airflow.configuration import conf

    return conf.getboolean("flywheel", "quick_scheduler", fallback=True)


class _Clock:
    """The `time` module for the scheduler's module, with a sleep that a database write ends."""

    def __init__(self, sleep) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str):
        return getattr(time, name)


def sqlite_database(url: str) -> Path | None:
    """The database file of an SQLAlchemy URL, where it is SQLite on disk."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def millisecond_now() -> None:
    """`func.now()` on SQLite as the current time to the millisecond, formatted as SQLAlchemy stores times."""
    from sqlalchemy.ext.compiler import compiles
    from sqlalchemy.sql.functions import now

    @compiles(now, "sqlite")
    def _now(element, compiler, **kw) -> str:
        return "(STRFTIME('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def apply() -> bool:
    """Both changes, in this (the scheduler's) process, where Airflow's database is SQLite; says whether.
    airflow_main calls it unless `[flywheel] quick_scheduler` is False (`quick_scheduler`)."""
    from airflow.configuration import conf
    from airflow.jobs import scheduler_job_runner

    database = sqlite_database(conf.get("database", "sql_alchemy_conn"))
    if database is None:
        return False
    millisecond_now()
    scheduler_job_runner.time = _Clock(DatabaseWrites(database).sleep)
    return True
