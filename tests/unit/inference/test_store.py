"""The inference index and feedback: spool lines in, labels matched by request id, live figures out.

Expectations come from the records the test writes: which answers it made, which labels it gave.
"""

from __future__ import annotations

import json
import time

import pytest

from flywheel.core.pipelines import parse
from flywheel.inference import feedback, records
from flywheel.inference.store import Store, row_loss

IRIS = parse(
    {
        "name": "iris",
        "format": "csv",
        "task": "classification",
        "framework": "xgboost",
        "metric": "accuracy",
        "target": "species",
        "features": ["a", "b", "c", "d"],
        "classes": ["setosa", "versicolor", "virginica"],
    },
    "iris.yaml",
)


def line(rid: str, version: str, role: str, predictions: list, t: float | None = None) -> str:
    return json.dumps(
        {
            "t": t or time.time(),
            "id": rid,
            "pipeline": "iris",
            "version": version,
            "role": role,
            "inputs": [[1, 2, 3, 4]] * len(predictions),
            "predictions": predictions,
            "ms": 1.5,
        }
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "index.sqlite")
    yield s
    s.close()


def spool(tmp_path, lines: list[str], name: str = "bento-iris-blue-0") -> list:
    folder = tmp_path / "spool" / "iris"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(f"{x}\n" for x in lines))
    claimed = records.claim(tmp_path / "spool", settled_seconds=0)
    found = []
    for path in claimed:
        found += records.read(path)[0]
    return found


def test_a_spool_file_is_claimed_once_and_a_torn_line_is_counted(tmp_path):
    folder = tmp_path / "spool" / "iris"
    folder.mkdir(parents=True)
    (folder / "r.jsonl").write_text(line("a", "1", "production", ["setosa"]) + "\n" + '{"t": 1, "id": "b", "pi')
    (claimed,) = records.claim(tmp_path / "spool", settled_seconds=0)
    assert not (folder / "r.jsonl").exists()
    found, bad = records.read(claimed)
    assert [r.id for r in found] == ["a"] and bad == 1


def test_the_same_record_twice_is_one_row(tmp_path, store):
    found = spool(tmp_path, [line("a", "1", "production", ["setosa"])])
    assert store.add_answers(found) == 1
    assert store.add_answers(found) == 0  # shipped again after a crash: still one row


def test_feedback_is_matched_by_request_id_item_by_item(tmp_path, store):
    store.add_answers(
        spool(
            tmp_path, [line("a", "1", "production", ["setosa"]), line("b", "2", "candidate", ["setosa", "virginica"])]
        )
    )
    result = feedback.record(
        store,
        IRIS,
        {
            "feedback": [
                {"request_id": "a", "label": "setosa"},
                {"request_id": "b", "label": ["setosa", "setosa"]},
                {"request_id": "nope", "label": "setosa"},
                {"request_id": "a b", "label": "setosa"},
                {"request_id": "b", "label": "setosa"},
                {"request_id": "a", "label": "tulip"},
            ]
        },
    )
    assert [i["matched"] for i in result["items"]] == [True, True, False, False, False, False]
    assert result["items"][0]["version"] == "1" and result["items"][1]["role"] == "candidate"
    assert "no answer" in result["items"][2]["error"]
    assert "2 prediction(s)" in result["items"][4]["error"]
    assert "not a class" in result["items"][5]["error"]


def test_a_body_that_is_not_feedback_is_refused_as_a_whole(store):
    for body in ([], {"feedback": []}, {"feedback": [{}] * 1001}, "x"):
        with pytest.raises(feedback.BadFeedback):
            feedback.record(store, IRIS, body)


def test_live_scores_per_version_and_role_and_shadow_disagreement(tmp_path, store):
    lines = [line(f"p{i}", "1", "production", ["setosa"]) for i in range(10)]
    lines += [line(f"c{i}", "2", "candidate", ["virginica"]) for i in range(10)]
    lines += [line(f"p{i}", "2", "shadow", ["setosa" if i < 7 else "virginica"]) for i in range(10)]
    store.add_answers(spool(tmp_path, lines))
    labels = {"feedback": [{"request_id": f"p{i}", "label": "setosa"} for i in range(10)]}
    labels["feedback"] += [{"request_id": f"c{i}", "label": "setosa" if i < 5 else "virginica"} for i in range(10)]
    assert feedback.record(store, IRIS, labels)["matched"] == 20
    live = store.live("iris", "accuracy", 0)
    assert live["versions"]["1"]["production"]["score"] == 1.0
    assert live["versions"]["2"]["candidate"]["score"] == 0.5
    assert live["versions"]["2"]["candidate"]["loss_mean"] == 0.5
    assert live["versions"]["2"]["shadow"]["answers"] == 10  # shadow copies are counted, never scored
    assert live["shadow"]["requests"] == 10 and live["shadow"]["disagreement"] == pytest.approx(0.3)


def test_only_shipped_rows_are_pruned(tmp_path, store):
    old = time.time() - 48 * 3600
    store.add_answers(
        spool(
            tmp_path, [line("a", "1", "production", ["setosa"], t=old), line("b", "1", "production", ["setosa"], t=old)]
        )
    )
    (first, *_) = store.unshipped("answers", 10)
    store.mark_shipped("answers", [first[0]])
    assert store.prune(keep_hours=24, max_rows=100) == 1
    assert [r[2] for r in store.unshipped("answers", 10)] == ["b"]


def test_row_loss():
    assert row_loss("accuracy", "a", "b") == 1.0 and row_loss("accuracy", 3, "3") == 0.0
    assert row_loss("rmse", 3.0, 1.0) == 4.0 and row_loss("mae", 3.0, 1.0) == 2.0


def test_concurrent_ingests_take_each_spool_file_once(tmp_path):
    """The service's loop and its live endpoint ingest at once: every record indexed once, no error."""
    import threading

    from flywheel.core.settings import Settings
    from flywheel.inference import collector

    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path / "state")})
    folder = settings.inference_spool / "iris"
    folder.mkdir(parents=True)
    for replica in range(4):
        lines = [
            json.dumps({"t": 1.0, "id": f"r{replica}-{i}", "pipeline": "iris", "version": "1", "predictions": ["a"]})
            for i in range(50)
        ]
        (folder / f"bento-{replica}.jsonl").write_text("\n".join(lines) + "\n")
    store = Store(tmp_path / "index.sqlite")
    counters = collector.Counters()
    errors = []

    def run():
        try:
            for _ in range(3):
                collector.ingest(settings, store, counters)
        except Exception as exc:  # the bug this guards against: FileNotFoundError mid-read
            errors.append(exc)

    collector.ingest(settings, store, counters)  # claims (renames) them; they are read once settled
    time.sleep(1.1)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts()["iris"]["answers"] == 200
