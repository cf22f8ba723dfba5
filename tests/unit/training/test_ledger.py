"""The uploads ledger: what a run accounts for, in which role, and where the next run starts."""

import datetime

from flywheel.core import schema
from flywheel.core.schema import Watermark
from flywheel.core.upload import Upload
from flywheel.training import ledger

PLANNED_AT = datetime.datetime(2026, 11, 23, 12, 0, 10, tzinfo=datetime.UTC)
TRAINED = Upload("iris", "datasets", "iris/c.csv", "c", "vc")


def event(i: int, key: str, version: str, uploaded: str, ts: str | None = None) -> dict:
    return {
        "id": i,
        "timestamp": ts or f"2026-11-23T12:00:{i:02d}.000000Z",
        "extra": {"key": key, "etag": version[1:], "version_id": version, "event_time": uploaded},
    }


def test_the_planned_upload_is_trained_and_the_older_ones_superseded():
    events = [
        event(1, "iris/a.csv", "va", "2026-11-23T12:00:01Z"),
        event(2, "iris/b.csv", "vb", "2026-11-23T12:00:02Z"),
        event(3, "iris/c.csv", "vc", "2026-11-23T12:00:03Z"),
    ]
    entries, mark = ledger.account(events, TRAINED, PLANNED_AT, "trained", "run-1")
    assert [(e.key, e.role) for e in entries] == [
        ("iris/a.csv", "superseded"),
        ("iris/b.csv", "superseded"),
        ("iris/c.csv", "trained"),
    ]
    assert entries[0].by == "iris/c.csv" and entries[2].by == "run-1"
    assert mark == Watermark("2026-11-23T12:00:03.000000Z", 3)


def test_an_upload_the_plan_may_not_have_seen_is_left_with_everything_after_it_for_the_next_run():
    events = [
        event(1, "iris/a.csv", "va", "2026-11-23T12:00:01Z"),
        event(2, "iris/late.csv", "vl", "2026-11-23T12:00:09.500Z"),  # within the clock margin of the plan
        event(3, "iris/c.csv", "vc", "2026-11-23T12:00:03Z"),  # a late delivery of an old upload
    ]
    entries, mark = ledger.account(events, TRAINED, PLANNED_AT, "trained", "run-1")
    assert [e.key for e in entries] == ["iris/a.csv"]
    assert mark.id == 1


def test_a_rejected_upload_keeps_that_role():
    events = [event(1, "iris/c.csv", "vc", "2026-11-23T12:00:03Z")]
    assert ledger.account(events, TRAINED, PLANNED_AT, "rejected", "r")[0][0].role == "rejected"


def test_re_emitted_events_match_by_version_not_by_event():
    reconciled = event(4, "iris/c.csv", "vc", "2026-11-23T12:00:03Z")
    reconciled["extra"]["reconciled"] = True
    [entry], _ = ledger.account([reconciled], TRAINED, PLANNED_AT, "trained", "run-2")
    assert entry.role == "trained"


def test_nothing_to_account_leaves_the_watermark_alone():
    assert ledger.account([], TRAINED, PLANNED_AT, "trained", "r") == ([], None)


def test_watermarks_order_by_time_then_id_and_survive_a_tag():
    a = Watermark("2026-11-23T12:00:03.000000Z", 9)
    b = Watermark("2026-11-23T12:00:03+00:00", 10)
    assert max([a, b], key=Watermark.key) is b
    assert Watermark.from_tag(b.to_tag()) == b
    assert Watermark.from_tag("") is None and Watermark.from_tag('{"id": "x"}') is None


def test_a_long_ledger_is_summarised_in_its_tag():
    entries = [
        schema.Entry(i, "t", f"iris/burst/{i:04d}-with-a-long-name.csv", "e", f"v{i}", "t", "superseded", "x")
        for i in range(300)
    ]
    assert len(schema.ledger_summary(entries)) < 4000
    assert '"superseded": 300' in schema.ledger_summary(entries)


def test_same_upload_prefers_the_version_id():
    a, b = Upload("iris", "datasets", "iris/a"), Upload("iris", "datasets", "iris/b")
    assert Upload.from_dict({**a.to_dict(), "version_id": "v1"}).same_as(
        Upload.from_dict({**b.to_dict(), "version_id": "v1"})
    )
    assert not Upload.from_dict({**a.to_dict(), "version_id": "v1"}).same_as(
        Upload.from_dict({**a.to_dict(), "version_id": "v2"})
    )
    assert Upload.from_dict({**a.to_dict(), "etag": '"e"'}).same_as(Upload.from_dict({**a.to_dict(), "etag": "e"}))


def test_the_planned_upload_is_accounted_however_close_to_the_listing_it_landed():
    """The plan listed it (it trained on it): the clock margin is for uploads it may have missed."""
    events = [
        event(1, "iris/a.csv", "va", "2026-11-23T12:00:01Z"),
        event(2, "iris/c.csv", "vc", "2026-11-23T12:00:09.800Z"),  # 0.2 s before the listing
    ]
    entries, mark = ledger.account(events, TRAINED, PLANNED_AT, "failed", "run-1")
    assert [(e.key, e.role) for e in entries] == [("iris/a.csv", "superseded"), ("iris/c.csv", "failed")]
    assert mark.id == 2
