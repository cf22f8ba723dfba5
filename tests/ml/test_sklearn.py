"""The scikit-learn framework, end to end below the platform: fit on wine, log and register it as training
does, build its Bento with the shared table service, serve it, and compare its answers with the model's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from bento_server import serve

from flywheel import frameworks
from flywheel.core import pipelines, schema
from flywheel.core.settings import REPO_ROOT
from flywheel.core.upload import Upload

PIPELINE = "wine"
framework = frameworks.get("sklearn")


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    bunch = load_wine()
    x_train, x_holdout, y_train, y_holdout = train_test_split(
        bunch.data.astype(np.float32), bunch.target, test_size=0.3, random_state=0, stratify=bunch.target
    )
    return SimpleNamespace(x_train=x_train, y_train=y_train, x_holdout=x_holdout, y_holdout=y_holdout)


@pytest.fixture(scope="module")
def pipeline():
    return pipelines.load(REPO_ROOT / "pipelines" / "wine.yaml")


@pytest.fixture(scope="module")
def trained(wine, pipeline):
    return framework.fit(pipeline, wine.x_train, wine.y_train, num_classes=3)


def test_the_pipeline_file_names_the_plugin_and_its_parameters(pipeline):
    assert pipeline.plugin is framework
    assert set(pipeline.params) <= set(framework.params)
    with pytest.raises(pipelines.PipelineError, match="unknown sklearn parameter 'max_epochs'"):
        pipelines.check_params("sklearn", {"max_epochs": 3}, "wine")


def test_fit_beats_chance_by_far_and_is_seeded(wine, pipeline, trained):
    predicted = framework.predict(trained, wine.x_holdout)
    assert predicted.dtype.kind == "i" and float((predicted == wine.y_holdout).mean()) >= 0.9
    again = framework.fit(pipeline, wine.x_train, wine.y_train, num_classes=3)
    np.testing.assert_array_equal(framework.predict(again, wine.x_holdout), predicted)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, wine, pipeline, trained):
    import mlflow
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = tmp_path_factory.mktemp("flywheel-sklearn")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "FLYWHEEL_STATE_DIR": str(root / "state"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        env["BENTOML_HOME"] = BentoMLContainer.bentoml_home.get()  # fixed on first use in this process
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiment = mlflow.create_experiment(PIPELINE, artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = framework.log_model(trained, wine.x_holdout[:3])
        client = mlflow.MlflowClient()
        client.create_registered_model(PIPELINE)
        classes = tuple(pipeline.classes)
        contract = schema.Contract("sklearn", "classification", "accuracy", pipeline.features, classes=classes)
        upload = Upload(PIPELINE, "datasets", "wine/wine.csv", "e" * 32, "v-wine-1")
        evaluation = schema.Evaluation(1.0, "", None, schema.PROMOTED, "first")
        version = client.create_model_version(
            PIPELINE,
            source=info.model_uri,
            run_id=run.info.run_id,
            model_id=info.model_id,
            tags=schema.version_tags(PIPELINE, upload, contract, evaluation),
        ).version
        yield SimpleNamespace(root=root, env=env, version=str(version), upload=upload)


def test_a_registered_version_loads_back(registry, wine, trained):
    loaded = framework.load(f"models:/{PIPELINE}/{registry.version}")
    np.testing.assert_array_equal(framework.predict(loaded, wine.x_holdout), framework.predict(trained, wine.x_holdout))


@pytest.fixture(scope="module")
def served(registry):
    from flywheel.serving.build import build

    built = build(PIPELINE, registry.version)
    with serve(built["bento_tag"], registry.env, registry.root / "serve.log", 90) as (client, _):
        yield SimpleNamespace(client=client, built=built)


def test_the_shared_table_service_serves_it(served, registry, wine, trained, pipeline):
    assert served.built["framework"] == "sklearn"
    rows = wine.x_holdout[:20]
    r = served.client.post("/predict", json={"inputs": rows.tolist()})
    assert r.status_code == 200, r.text
    expected = [pipeline.classes[int(i)] for i in framework.predict(trained, rows)]
    assert r.json()["predictions"] == expected
    assert r.json()["model"]["version"] == registry.version
    assert r.json()["dataset"] == registry.upload.answer()
    keyed = [dict(zip(pipeline.features, map(float, rows[0])))]
    assert served.client.post("/predict", json={"inputs": keyed}).json()["predictions"] == expected[:1]


def test_a_row_of_the_wrong_width_is_a_400(served):
    r = served.client.post("/predict", content=json.dumps({"inputs": [[1.0, 2.0]]}))
    assert r.status_code == 400 and "at least 13" in r.text
