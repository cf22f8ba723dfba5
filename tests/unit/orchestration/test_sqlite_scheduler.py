"""The scheduler on SQLite acts on another process's commit at once (orchestration/sqlite_scheduler.py)."""

from __future__ import annotations

import datetime
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from flywheel.orchestration import sqlite_scheduler
from flywheel.orchestration.sqlite_scheduler import DatabaseWrites

# Sleeps that must end early get this long: far more than any wake-up takes, so a pass never races it.
LONG = 30.0


@pytest.fixture
def database(tmp_path):
    """An SQLite database in WAL mode, as Airflow's is, with a table to write to."""
    path = tmp_path / "airflow.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=wal")
        db.execute("CREATE TABLE t (v INTEGER)")
    return path


def write(path, delay: float = 0.0) -> None:
    """A commit from another process, after `delay` seconds."""
    code = f"import sqlite3, time; time.sleep({delay}); db = sqlite3.connect({str(path)!r}); "
    code += "db.execute('INSERT INTO t VALUES (1)'); db.commit()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def in_background(fn, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args)
    thread.start()
    return thread


def test_another_process_committing_ends_the_sleep(database):
    writes = DatabaseWrites(database)
    writer = in_background(write, database, 0.3)
    started = time.monotonic()
    writes.sleep(LONG)
    slept = time.monotonic() - started
    writer.join()
    assert slept < LONG / 2, slept


def test_nothing_written_sleeps_the_whole_time_and_other_files_do_not_wake_it(database):
    writes = DatabaseWrites(database)
    (database.parent / "airflow.cfg").write_text("[core]\n")
    writes.sleep(0)  # what happened before is not a reason to skip a sleep
    started = time.monotonic()
    in_background((database.parent / "airflow.cfg").write_text, "[core]\nx = 1\n")
    writes.sleep(0.5)
    assert time.monotonic() - started >= 0.5


def test_writes_during_a_loop_skip_one_sleep_never_two_in_a_row(database):
    """A commit that landed while the scheduler's loop ran (its own, or one it may have missed) buys
    one more loop at once; after that loop, the sleep is whole again, whoever keeps writing."""
    writes = DatabaseWrites(database)
    write(database)  # during "the loop"
    started = time.monotonic()
    writes.sleep(LONG)
    assert time.monotonic() - started < LONG / 2  # skipped
    write(database)  # the next loop wrote too
    started = time.monotonic()
    writes.sleep(0.5)
    assert time.monotonic() - started >= 0.5  # slept


def test_a_signal_during_the_sleep_raises_as_in_time_sleep(database):
    """Airflow stops its scheduler from a signal handler: the exception it raises must end the sleep."""

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Stop):
            DatabaseWrites(database).sleep(LONG)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_now_on_sqlite_has_milliseconds_so_a_run_created_this_second_is_due(tmp_path):
    """Airflow's `run_after <= now()`: a run created 0.2 s ago is due. With SQLite's CURRENT_TIMESTAMP
    (whole seconds) it is not, until the next second starts."""
    from sqlalchemy import Column, DateTime, Integer, MetaData, Table, create_engine, func, insert, select

    sqlite_scheduler.millisecond_now()
    engine = create_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    runs = Table("dag_run", MetaData(), Column("id", Integer, primary_key=True), Column("run_after", DateTime))
    runs.metadata.create_all(engine)
    while (now := datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).microsecond < 300_000:
        time.sleep(0.05)  # 0.2 s before now is in the same whole second
    with engine.begin() as db:
        db.execute(insert(runs).values(id=1, run_after=now - datetime.timedelta(seconds=0.2)))
        assert db.execute(select(runs.c.id).where(runs.c.run_after <= func.now())).all() == [(1,)]
        whole = db.exec_driver_sql("SELECT id FROM dag_run WHERE run_after <= CURRENT_TIMESTAMP").all()
        if datetime.datetime.now(datetime.UTC).replace(tzinfo=None).second == now.second:
            assert whole == []  # Airflow's own query, unchanged, within the same second


def test_only_an_sqlite_database_on_disk_is_watched():
    assert str(sqlite_scheduler.sqlite_database("sqlite:////srv/airflow/airflow.db")) == "/srv/airflow/airflow.db"
    assert sqlite_scheduler.sqlite_database("sqlite://") is None
    assert sqlite_scheduler.sqlite_database("postgresql+psycopg2://flywheel:x@postgres:5432/airflow") is None


def test_the_scheduler_module_sleeps_through_it_where_airflow_is_on_sqlite(database, monkeypatch):
    from airflow.configuration import conf
    from airflow.jobs import scheduler_job_runner

    real = conf.get
    monkeypatch.setattr(
        conf,
        "get",
        lambda s, k, *a, **kw: (
            f"sqlite:///{database}" if (s, k) == ("database", "sql_alchemy_conn") else real(s, k, *a, **kw)
        ),
    )
    monkeypatch.setattr(scheduler_job_runner, "time", time)
    assert sqlite_scheduler.apply()
    assert isinstance(scheduler_job_runner.time.sleep.__self__, DatabaseWrites)
    assert scheduler_job_runner.time.monotonic is time.monotonic  # the rest of `time` is untouched
