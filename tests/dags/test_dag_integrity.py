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
