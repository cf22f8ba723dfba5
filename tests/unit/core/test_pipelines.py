"""Pipeline files: the shipped ones load; mistakes name the file and the field."""

import re
from pathlib import Path

import pytest

from flywheel.core import pipelines
from flywheel.core.settings import REPO_ROOT

GOOD = """
name: demo
format: csv
task: classification
target: y
features: [a, b]
framework: xgboost
metric: accuracy
"""


IMAGE = """
name: demo
format: idx
task: classification
image: {shape: [8, 8], max_value: 16}
framework: tensorflow
metric: accuracy
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_pipelines_load():
    loaded, errors = pipelines.load_all(REPO_ROOT / "pipelines")
    assert errors == {}
    iris = next(p for p in loaded if p.name == "iris")
    assert iris.dataset_uri == "s3://datasets/iris"
    assert iris.model_uri == "model://iris/production"
    assert len(iris.features) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("target: y\n", ""), "missing required field 'target'"),
        (GOOD.replace("task: classification", "task: clustering"), "field 'task' is 'clustering'"),
        (GOOD.replace("features: [a, b]", "features: []"), "field 'features'"),
        (GOOD.replace("framework: xgboost", "framework: pytorch"), "field 'framework' is 'pytorch'"),
        (GOOD.replace("framework: xgboost", "framework: tensorflow"), "framework 'tensorflow' trains image formats"),
        (GOOD.replace("metric: accuracy", "metric: rmse"), "field 'metric' is 'rmse'"),
        (GOOD.replace("features: [a, b]", "features: [a, y]"), "also listed in 'features'"),
        (GOOD + "holdout: {fraction: 1.5}\n", "holdout.fraction"),
        (GOOD + "holdout: {object: other/x.csv}\n", "holdout.object"),
        (GOOD + "gate: {floor: high}\n", "gate.floor"),
        (GOOD + "gate: {margin: -1}\n", "gate.margin"),
        (GOOD + "validation: {min_class_fraction: 0.9}\n", "validation.min_class_fraction"),
        (GOOD + "epochs: 3\n", "unknown field(s) epochs"),
        (IMAGE.replace("shape: [8, 8]", "shape: [8]"), "image.shape"),
        (IMAGE.replace("framework: tensorflow", "framework: xgboost"), "framework 'xgboost' trains table formats"),
        (GOOD + "rollout: {strategy: blue}\n", "rollout.strategy"),
        (GOOD + "rollout: {strategy: canary, steps: [50, 10, 100]}\n", "rollout.steps"),
        (GOOD + "rollout: {steps: [10, 50]}\n", "rollout.steps"),
        (GOOD + "rollout: {guardrails: {error_ratio: 2}}\n", "rollout.guardrails.error_ratio"),
        (GOOD + "rollout: {guardrails: {p95_ms: 2}}\n", "rollout.guardrails.p95_ms"),
        (GOOD + "rollout: {shadow: {then: ab}}\n", "rollout.shadow.then"),
        (GOOD + "rollout: {ab: {key: 'X User'}}\n", "rollout.ab.key"),
        (GOOD + "rollout: {ab: {split: 100}}\n", "rollout.ab.split"),
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "expected a mapping"),
    ],
)
def test_mistakes_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, "demo", text)
    with pytest.raises(pipelines.PipelineError) as err:
        pipelines.load(path)
    assert "demo.yaml" in str(err.value)
    assert message in str(err.value)


def test_shipped_pipelines_cover_tables_regression_and_images():
    loaded = {p.name: p for p in pipelines.load_all(REPO_ROOT / "pipelines")[0]}
    assert loaded["diabetes"].task == "regression" and not loaded["diabetes"].higher_is_better
    assert loaded["digits"].framework == "tensorflow" and loaded["digits"].image_shape == (8, 8)


def test_idx_sets_train_on_their_marker_only(tmp_path):
    idx = pipelines.load(write(tmp_path, "demo", IMAGE))
    assert not idx.triggers("demo/set1/train-images-idx3-ubyte.gz")
    assert not idx.triggers("demo/set1/train-labels-idx1-ubyte.gz")
    assert idx.triggers("demo/set1/_SUCCESS")
    csv = pipelines.load(write(tmp_path, "demo", GOOD + "holdout: {object: demo/holdout.csv}\n"))
    assert csv.triggers("demo/new.csv")
    assert not csv.triggers("demo/holdout.csv")  # the fixed holdout is not a training set


def test_name_must_match_file(tmp_path):
    with pytest.raises(pipelines.PipelineError, match="file is named 'other'"):
        pipelines.load(write(tmp_path, "other", GOOD))


def test_a_broken_file_does_not_hide_the_others(tmp_path):
    write(tmp_path, "demo", GOOD)
    write(tmp_path, "broken", "name: broken\n")
    loaded, errors = pipelines.load_all(tmp_path)
    assert [p.name for p in loaded] == ["demo"]
    assert list(errors) == ["broken"] and "broken.yaml" in str(errors["broken"])


def test_serving_replicas_default_to_two_and_are_bounded(tmp_path):
    assert pipelines.load(write(tmp_path, "demo", GOOD)).replicas == 2
    assert pipelines.load(write(tmp_path, "demo", GOOD + "serving: {replicas: 3}\n")).replicas == 3
    for bad in ("0", "9", "1.5", "two"):
        with pytest.raises(pipelines.PipelineError, match=r"serving\.replicas"):
            pipelines.load(write(tmp_path, "demo", GOOD + f"serving: {{replicas: {bad}}}\n"))
    with pytest.raises(pipelines.PipelineError, match=r"serving\.replica"):
        pipelines.load(write(tmp_path, "demo", GOOD + "serving: {replica: 2}\n"))


def test_rollout_defaults_in_one_place_and_overrides(tmp_path):
    plain = pipelines.load(write(tmp_path, "demo", GOOD))
    assert plain.rollout == pipelines.Rollout() and not plain.rollout.live
    text = GOOD + (
        "rollout:\n  strategy: canary\n  steps: [25, 100]\n  bake_seconds: 5\n"
        "  guardrails: {live_score_drop: 0.1, min_feedback: 10}\n  ab: {key: X-Team}\n"
    )
    r = pipelines.load(write(tmp_path, "demo", text)).rollout
    assert (r.strategy, r.steps, r.bake_seconds, r.live_score_drop, r.min_feedback, r.ab_key) == (
        "canary",
        (25, 100),
        5.0,
        0.1,
        10,
        "X-Team",
    )
    assert r.live and r.error_ratio == pipelines.Rollout.error_ratio  # what is not said keeps its default


def test_monitor_and_retrain_defaults_and_overrides(tmp_path):
    plain = pipelines.load(write(tmp_path, "demo", GOOD))
    assert plain.monitor == pipelines.Monitor() and plain.monitor.enabled
    assert plain.retrain == pipelines.Retrain() and not plain.retrain.on_drift
    text = GOOD + (
        "monitor: {every_minutes: 1, window_minutes: 2, min_rows: 50}\n"
        "retrain: {schedule: '*/10 * * * *', on_drift: true, with_feedback: true}\n"
    )
    p = pipelines.load(write(tmp_path, "demo", text))
    assert (p.monitor.every_minutes, p.monitor.window_minutes, p.monitor.min_rows) == (1.0, 2.0, 50)
    assert p.monitor.alpha == pipelines.Monitor.alpha
    assert (p.retrain.schedule, p.retrain.on_drift, p.retrain.with_feedback) == ("*/10 * * * *", True, True)
    assert not pipelines.load(write(tmp_path, "demo", GOOD + "monitor: false\n")).monitor.enabled
    daily = pipelines.load(write(tmp_path, "demo", GOOD + "retrain: {schedule: '@daily'}\n"))
    assert daily.retrain.schedule == "@daily"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("monitor: {every: 5}\n", "unknown field(s) monitor.every"),
        ("monitor: {every_minutes: 0}\n", "'monitor.every_minutes' must be between 1"),
        ("monitor: 3\n", "'monitor' must be a mapping or false"),
        ("retrain: {schedule: 'often'}\n", "'retrain.schedule' must be a cron expression"),
        ("retrain: {on_drift: 'yes'}\n", "'retrain.on_drift' must be true or false"),
        ("retrain: {with_feedback: true}\n", "set retrain.on_drift"),
        ("monitor: false\nretrain: {on_drift: true}\n", "needs the monitor"),
    ],
)
def test_monitor_and_retrain_mistakes_are_named(tmp_path, extra, message):
    with pytest.raises(pipelines.PipelineError, match=re.escape(message)):
        pipelines.load(write(tmp_path, "demo", GOOD + extra))


def test_feedback_retraining_is_for_tables(tmp_path):
    with pytest.raises(pipelines.PipelineError, match="for tables"):
        pipelines.load(write(tmp_path, "demo", IMAGE + "retrain: {on_drift: true, with_feedback: true}\n"))


def test_inference_log_sampling_and_retention(tmp_path):
    plain = pipelines.load(write(tmp_path, "demo", GOOD))
    assert plain.inference_log == pipelines.InferenceLog(sample=1.0, keep_days=None)
    p = pipelines.load(write(tmp_path, "demo", GOOD + "inference_log: {sample: 0.25, keep_days: 7}\n"))
    assert (p.inference_log.sample, p.inference_log.keep_days) == (0.25, 7)
    for bad, message in (
        ("inference_log: {sample: 0}\n", "'inference_log.sample' must be between 0.001 and 1"),
        ("inference_log: {keep_days: 1.5}\n", "'inference_log.keep_days' must be a whole number"),
        ("inference_log: {days: 3}\n", "unknown field(s) inference_log.days"),
    ):
        with pytest.raises(pipelines.PipelineError, match=re.escape(message)):
            pipelines.load(write(tmp_path, "demo", GOOD + bad))


def test_a_file_removed_while_listing_is_gone_not_broken(tmp_path, monkeypatch):
    write(tmp_path, "demo", GOOD)
    vanished = write(tmp_path, "other", GOOD.replace("name: demo", "name: other"))
    real_load = pipelines.load

    def load_after_removal(path):
        if path == vanished:
            path.unlink()
        return real_load(path)

    monkeypatch.setattr(pipelines, "load", load_after_removal)
    loaded, errors = pipelines.load_all(tmp_path)
    assert [p.name for p in loaded] == ["demo"] and errors == {}


def test_a_cron_airflow_cannot_read_is_refused_here(tmp_path):
    with pytest.raises(pipelines.PipelineError, match="not a valid cron expression"):
        pipelines.load(write(tmp_path, "demo", GOOD + "retrain: {schedule: '99 * * * *'}\n"))
    assert pipelines.load(write(tmp_path, "demo", GOOD + "retrain: {schedule: '*/5 * * * 1-5'}\n")).retrain.schedule
