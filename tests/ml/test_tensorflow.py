"""Fit the Keras CNN on 8x8 digits, log it to a local MLflow, build its bento, serve it, probe it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from bento_server import serve

from flywheel.core import schema
from flywheel.core.upload import Upload
from flywheel.frameworks import tensorflow

framework = tensorflow.FRAMEWORK

PIPELINE = "digits"
EPOCHS = 3
CLASSES = [str(c) for c in range(10)]
DATASET = {
    "uri": "s3://datasets/digits/digits.npz",
    "key": "digits/digits.npz",
    "etag": "fedcba9876543210fedcba9876543210",
    "version_id": "v-digits-1",
}
READY_TIMEOUT_S = 120


def _pipeline(**params):
    return SimpleNamespace(
        params={"epochs": EPOCHS, "batch_size": 32, "learning_rate": 0.003, "filters": 16, **params},
        seed=42,
        image_shape=(8, 8),
        max_value=16.0,
    )


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, x_holdout, y_train, y_holdout = train_test_split(
        bunch.images, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target
    )
    return SimpleNamespace(x_train=x_train, y_train=y_train, x_holdout=x_holdout, y_holdout=y_holdout)


@pytest.fixture(scope="module")
def trained(digits):
    started = time.perf_counter()
    model = framework.fit(_pipeline(), digits.x_train, digits.y_train, num_classes=10)
    print(f"fit {EPOCHS} epochs on {len(digits.x_train)} images: {time.perf_counter() - started:.2f}s", file=sys.stderr)
    return model


# ---- fit and predict ----------------------------------------------------------------------------


def test_fit_reaches_holdout_accuracy(digits, trained):
    predicted = framework.predict(trained, digits.x_holdout)
    assert predicted.shape == (len(digits.x_holdout),) and predicted.dtype.kind == "i"
    accuracy = float((predicted == digits.y_holdout).mean())
    assert accuracy >= 0.85, accuracy


def test_same_seed_same_predictions(digits, trained):
    again = framework.fit(_pipeline(), digits.x_train, digits.y_train, num_classes=10)
    np.testing.assert_array_equal(
        framework.predict(again, digits.x_holdout), framework.predict(trained, digits.x_holdout)
    )
    np.testing.assert_array_equal(
        tensorflow.probabilities(again, digits.x_holdout), tensorflow.probabilities(trained, digits.x_holdout)
    )


def test_architecture_adapts_to_28x28():
    model = tensorflow.build_model((28, 28), 255.0, 10, filters=8)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert len(convs) == 3  # 28 -> 14 -> 7 -> 3
    assert model.input_shape == (None, 28, 28) and model.output_shape == (None, 10)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
    assert framework.predict(model, images).shape == (3,)


def test_unknown_param_is_an_error(digits):
    pipeline = _pipeline()
    pipeline.params = {"epoch": 2}
    with pytest.raises(ValueError, match=r"unknown tensorflow params \['epoch'\]"):
        framework.fit(pipeline, digits.x_train[:10], digits.y_train[:10], num_classes=10)


# ---- MLflow -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory, digits, trained):
    """A fresh MLflow (sqlite + local artifacts) holding `digits` v1, tagged as training tags it."""
    import mlflow
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = tmp_path_factory.mktemp("flywheel-images")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "FLYWHEEL_STATE_DIR": str(root / "state"),
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # BentoML fixes its home on first use in a process (another test module may have been
        # first): the server must look in the same store the build writes to.
        env["BENTOML_HOME"] = BentoMLContainer.bentoml_home.get()
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiment = mlflow.create_experiment(PIPELINE, artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            # Epoch metrics go to the active run.
            model = framework.fit(_pipeline(epochs=2), digits.x_train, digits.y_train, num_classes=10)
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                info = framework.log_model(trained, digits.x_holdout[:3])
        client = mlflow.MlflowClient()
        client.create_registered_model(PIPELINE)
        contract = schema.Contract(
            "tensorflow", "classification", "accuracy", image_shape=(8, 8), max_value=16.0, classes=tuple(CLASSES)
        )
        upload = Upload(PIPELINE, "datasets", DATASET["key"], DATASET["etag"], DATASET["version_id"])
        tags = {schema.PIPELINE: PIPELINE, **contract.tags(), **schema.upload_tags(upload)}
        version = client.create_model_version(
            PIPELINE, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id, tags=tags
        ).version
        version = str(version)
        yield SimpleNamespace(
            root=root,
            env=env,
            version=version,
            info=info,
            run_id=run.info.run_id,
            stdout=stdout.getvalue(),
            epochs_model=model,
        )


def test_log_model_and_load_round_trip(registry, digits, trained):
    import mlflow

    assert registry.stdout == ""  # Keras' progress bar stays out of the task log's stdout
    assert registry.info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 8, 8)
    loaded = framework.load(f"models:/{PIPELINE}/{registry.version}")
    np.testing.assert_array_equal(
        framework.predict(loaded, digits.x_holdout), framework.predict(trained, digits.x_holdout)
    )
    history = mlflow.MlflowClient().get_metric_history(registry.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1]


# ---- build --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(registry):
    from flywheel.serving.build import build

    result = build(PIPELINE, registry.version)
    print(f"build: {result['build_seconds']}s", file=sys.stderr)
    return result


def test_build_result_and_spec(registry, built):
    import bentoml

    version = registry.version
    assert built["bento_tag"] == f"flywheel-digits:v{version}"
    assert built["model_tag"] == f"digits:v{version}"
    assert built["framework"] == "tensorflow"
    assert built["example"] == [[0.0] * 8 for _ in range(8)]
    folder = registry.root / "state" / "bento-builds" / f"digits-v{version}"
    spec = json.loads((folder / "flywheel_model.json").read_text())
    assert spec["image_shape"] == [8, 8] and spec["max_value"] == 16.0
    assert spec["classes"] == CLASSES and spec["dataset"] == DATASET and spec["run_id"] == registry.run_id
    assert (folder / "image_service.py").exists()
    stored = bentoml.models.get(built["model_tag"])
    assert os.path.getsize(stored.path_of("model.keras")) > 0
    assert [str(m.tag) for m in bentoml.bentos.get(built["bento_tag"]).info.all_models] == [built["model_tag"]]


def test_build_rejects_tags_that_disagree_with_the_model(registry, built):
    import mlflow

    from flywheel.serving.build import BuildError, build

    client = mlflow.MlflowClient()
    # The same logged model registered again, with tags that do not describe it.
    wrong = client.create_model_version(PIPELINE, registry.info.model_uri, run_id=registry.run_id).version
    tags = {k: v for k, v in client.get_model_version(PIPELINE, registry.version).tags.items()}
    for key, value in {**tags, schema.IMAGE_SHAPE: "[28, 28]"}.items():
        client.set_model_version_tag(PIPELINE, wrong, key, value)
    with pytest.raises(BuildError, match=r"takes images of shape \[8, 8\] but the tag says \[28, 28\]"):
        build(PIPELINE, wrong)
    client.set_model_version_tag(PIPELINE, wrong, schema.IMAGE_SHAPE, "[8, 8]")
    client.set_model_version_tag(PIPELINE, wrong, schema.CLASSES, json.dumps(CLASSES[:3]))
    with pytest.raises(BuildError, match=r"predicts 10 classes"):
        build(PIPELINE, wrong)
    client.delete_model_version_tag(PIPELINE, wrong, schema.MAX_VALUE)
    with pytest.raises(BuildError, match=f"lacks the tag {schema.MAX_VALUE}"):
        build(PIPELINE, wrong)


# ---- serve --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(registry, built):
    log_path = registry.root / "serve.log"
    # Batching on (digits ships with it off, measured), and the request log that shows each pass.
    env = {**registry.env, "FLYWHEEL_BATCHING": "on", "FLYWHEEL_REQUEST_LOG": str(registry.root / "requests.log")}
    with serve(built["bento_tag"], env, log_path, READY_TIMEOUT_S) as (client, url):
        yield SimpleNamespace(client=client, url=url, log=log_path, registry=registry)


def _predict(client: httpx.Client, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return client.post("/predict", content=content, headers=headers, **kwargs)


def test_smoke_example_is_served(server, built):
    response = _predict(server.client, {"inputs": [built["example"]]})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


def test_predicts_real_digits(server, digits, trained):
    images = digits.x_holdout[:6]
    expected = [str(i) for i in framework.predict(trained, images)]
    inputs = [image.tolist() for image in images[:5]] + [images[5].reshape(-1).tolist()]  # the last one flat
    response = _predict(server.client, {"inputs": inputs}, headers={"X-Request-Id": "digits-req-7"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "predictions": expected,
        "model": {"pipeline": PIPELINE, "name": PIPELINE, "version": server.registry.version},
        "dataset": DATASET,
    }
    assert expected == [str(y) for y in digits.y_holdout[:6]]  # and they are right
    assert response.headers["X-Model-Name"] == PIPELINE
    assert response.headers["X-Model-Version"] == server.registry.version
    assert response.headers["X-Dataset-Version"] == DATASET["etag"]
    assert response.headers["X-Request-Id"] == "digits-req-7"


def test_concurrent_requests_are_batched(server, digits, trained):
    images = digits.x_holdout[:48]
    expected = [str(i) for i in framework.predict(trained, images)]

    def one(i: int) -> str:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            response = _predict(client, {"inputs": [images[i].tolist()]})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert list(pool.map(one, range(len(images)))) == expected
    time.sleep(1.5)  # the request log is written once a second
    passes = [int(m) for m in re.findall(r"forward_pass=(\d+)", (server.registry.root / "requests.log").read_text())]
    assert len(passes) >= len(images)
    assert max(passes) > 1, f"16 concurrent clients, yet no two images shared a forward pass: {passes}"


GOOD = [[0.0] * 8 for _ in range(8)]
BAD_INPUTS = {
    "seven rows": ({"inputs": [GOOD[:7]]}, "at least 8"),
    "short row": ({"inputs": [[*GOOD[:7], [0.0] * 7]]}, "at least 8"),
    "flat, wrong length": ({"inputs": [[0.0] * 63]}, "at least 64"),
    "above max_value": ({"inputs": [[[17.0] * 8, *GOOD[1:]]]}, "less than or equal to 16"),
    "negative": ({"inputs": [[[-1] * 8, *GOOD[1:]]]}, "greater than or equal to 0"),
    "string value": ({"inputs": [[["3"] * 8, *GOOD[1:]]]}, "valid number"),
    "nan": ('{"inputs": [[NaN' + ", 0" * 63 + "]]}", "finite number"),
    "image is a string": ({"inputs": ["digit"]}, "each image must be"),
    "empty list": ({"inputs": []}, "at least 1"),
    "too many images": ({"inputs": [GOOD] * 257}, "at most 256"),
    "invalid json": ('{"inputs": [[0.0,', "Invalid JSON"),
}


@pytest.mark.parametrize("body,reason", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_400_with_reason(server, body, reason):
    response = _predict(server.client, body)
    assert response.status_code == 400, response.text
    assert reason in json.dumps(response.json()), response.text


def test_still_serving_after_bad_inputs(server, digits):
    response = _predict(server.client, {"inputs": [digits.x_holdout[0].tolist()]})
    assert response.status_code == 200
    assert response.json()["predictions"] == [str(digits.y_holdout[0])]
