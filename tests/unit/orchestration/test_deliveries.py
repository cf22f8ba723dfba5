"""The bridge acts once on each upload, however many times MinIO tells of it (deliveries.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flywheel.core.upload import Upload
from flywheel.orchestration.deliveries import Deliveries

UPLOAD = Upload(pipeline="iris", bucket="datasets", key="iris/a.csv", etag="e", version_id="v1")


def test_the_second_delivery_is_not_acted_on_even_by_a_restarted_bridge(tmp_path):
    path = tmp_path / "deliveries.db"
    with Deliveries(path).first(UPLOAD) as first:
        assert first
    with Deliveries(path).first(UPLOAD) as again:  # a new process: the record is on disk
        assert not again
    other_version = Upload(**{**UPLOAD.__dict__, "version_id": "v2"})
    with Deliveries(path).first(other_version) as first:
        assert first


def test_a_delivery_that_failed_is_not_recorded(tmp_path):
    deliveries = Deliveries(tmp_path / "deliveries.db")
    with pytest.raises(RuntimeError), deliveries.first(UPLOAD) as first:
        assert first
        raise RuntimeError("Airflow away: answered 503, MinIO keeps it queued")
    with deliveries.first(UPLOAD) as first:
        assert first
    assert deliveries.gates == {}


def test_two_deliveries_at_once_act_once(tmp_path):
    deliveries = Deliveries(tmp_path / "deliveries.db")
    acted, inside = [], threading.Event()

    def deliver(_):
        with deliveries.first(UPLOAD) as first:
            if first:
                inside.set()
                time.sleep(0.2)  # forwarding to Airflow: the other delivery arrives meanwhile
                acted.append(1)
            return first

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(deliver, range(8)))
    assert sorted(outcomes) == [False] * 7 + [True] and acted == [1]
    assert deliveries.gates == {}


def test_records_older_than_the_retention_go(tmp_path):
    deliveries = Deliveries(tmp_path / "deliveries.db", keep_seconds=0.05)
    with deliveries.first(UPLOAD):
        pass
    time.sleep(0.1)
    with deliveries.first(Upload(**{**UPLOAD.__dict__, "key": "iris/b.csv"})):
        pass
    assert deliveries.count() == 1
