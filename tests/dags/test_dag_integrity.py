"""DAG integrity: the DAG folder imports with no error, wires assets as the lineage says, stays cheap."""

import sys

import pytest

from flywheel.core.settings import REPO_ROOT


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_every_pipeline_has_train_and_deploy(dagbag):
    from flywheel.core import pipelines

    for p in pipelines.load_all(REPO_ROOT / "pipelines")[0]:
        assert f"train_{p.name}" in dagbag.dag_ids
        assert f"deploy_{p.name}" in dagbag.dag_ids


def test_lineage_dataset_to_deployment(dagbag):
    train, deploy = dagbag.dags["train_iris"], dagbag.dags["deploy_iris"]
    assert [a.uri for a in train.timetable.asset_condition.objects] == ["s3://datasets/iris"]
    assert [o.uri for o in train.get_task("publish").outlets] == ["model://iris/production"]
    assert [a.uri for a in deploy.timetable.asset_condition.objects] == ["model://iris/production"]
    assert [o.uri for o in deploy.get_task("judge").outlets] == ["deployment://iris/production"]
    assert train.max_active_runs == 1


def test_parsing_imports_no_ml_library():
    heavy = ("mlflow", "xgboost", "tensorflow", "bentoml", "pandas", "sklearn")
    code = (
        "import sys, importlib.util; sys.path.insert(0, 'dags');"
        "import flywheel_pipelines;"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_pipeline_is_monitored_from_its_inference_log(dagbag):
    from flywheel.core import pipelines

    for p in pipelines.load_all(REPO_ROOT / "pipelines")[0]:
        monitor = dagbag.dags[f"monitor_{p.name}"]
        assert [i.uri for i in monitor.get_task("check").inlets] == [f"s3://inference/{p.name}"]
        assert monitor.max_active_runs == 1


def test_drift_retraining_closes_the_loop_and_a_schedule_adds_the_clock(dagbag):
    import dataclasses
    import importlib.util

    from flywheel.core import pipelines

    spec = importlib.util.spec_from_file_location("flywheel_dags", REPO_ROOT / "dags" / "flywheel_pipelines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iris = pipelines.get(REPO_ROOT / "pipelines", "iris")
    looped = dataclasses.replace(iris, retrain=pipelines.Retrain(schedule="@daily", on_drift=True, with_feedback=True))
    monitor = module.monitor_dag(looped)
    assert [o.uri for o in monitor.get_task("emit").outlets] == ["s3://datasets/iris"]
    assert monitor.get_task("retrain").upstream_task_ids == {"check"}
    assert monitor.get_task("emit").upstream_task_ids == {"retrain"}
    train = module.train_dag(looped)
    assert type(train.timetable).__name__ == "AssetOrTimeSchedule"
    assert [a.uri for a in train.timetable.asset_condition.objects] == ["s3://datasets/iris"]
    assert "retrain" not in dagbag.dags["monitor_iris"].task_ids  # the shipped iris does not retrain on drift
