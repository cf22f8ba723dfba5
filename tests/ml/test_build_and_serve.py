"""Train a tiny iris model into a local MLflow, build its bento, serve it, and probe the HTTP API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from bento_server import serve

from flywheel.core import schema
from flywheel.core.upload import Upload

PIPELINE = "iris"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
DATASET = {
    "uri": "s3://datasets/iris/iris.csv",
    "key": "iris/iris.csv",
    "etag": "0123456789abcdef0123456789abcdef",
    "version_id": "v-test-1",
}
# (row, species) from the iris data: one of each species, far from the class borders.
KNOWN = [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([7.0, 3.2, 4.7, 1.4], "versicolor"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
]
READY_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh MLflow (sqlite + local artifacts) holding `iris` v1, tagged as training tags it."""
    import mlflow
    import mlflow.xgboost
    import numpy as np
    import pandas as pd
    import xgboost as xgb
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris

    root = tmp_path_factory.mktemp("flywheel")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "FLYWHEEL_STATE_DIR": str(root / "state"),
        # One store for the whole module: BentoML reads BENTOML_HOME once per process.
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])

        data = load_iris()
        classes = [str(name) for name in data.target_names]
        X = pd.DataFrame(data.data.astype(np.float32), columns=FEATURES)
        booster = xgb.train(
            {"objective": "multi:softprob", "num_class": len(classes), "max_depth": 3, "eta": 0.3},
            xgb.DMatrix(X, label=data.target),
            num_boost_round=10,
        )
        experiment = mlflow.create_experiment("iris", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            probabilities = booster.inplace_predict(X[:5])
            info = mlflow.xgboost.log_model(
                booster,
                name="model",
                signature=infer_signature(X[:5], probabilities),
                input_example=X[:2],
                registered_model_name=PIPELINE,
            )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        tags = {
            schema.PIPELINE: PIPELINE,
            **schema.Contract("xgboost", "classification", "accuracy", tuple(FEATURES), classes=tuple(classes)).tags(),
            **schema.upload_tags(Upload(PIPELINE, "datasets", DATASET["key"], DATASET["etag"], DATASET["version_id"])),
        }
        for key, value in tags.items():
            client.set_model_version_tag(PIPELINE, version, key, value)
        yield {"root": root, "env": env, "version": version}


@pytest.fixture(scope="module")
def built(registry):
    from flywheel.serving.build import build

    return build(PIPELINE, registry["version"])


@pytest.fixture(scope="module")
def server(registry, built):
    log_path = registry["root"] / "serve.log"
    requests_log = registry["root"] / "requests.log"
    env = {**registry["env"], "FLYWHEEL_REQUEST_LOG": str(requests_log)}
    with serve(built["bento_tag"], env, log_path, READY_TIMEOUT_S, client_timeout=5) as (client, _):
        yield {"client": client, "log": log_path, "requests_log": requests_log, "registry": registry}


def _predict(client: httpx.Client, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return client.post("/predict", content=content, headers=headers, **kwargs)


# ---- build ----------------------------------------------------------------------------------


def test_missing_version_is_a_clear_error(registry):
    from flywheel.serving.build import BuildError, build

    with pytest.raises(BuildError, match=r"iris v999 is not registered"):
        build(PIPELINE, "999")
    with pytest.raises(BuildError, match=r"nosuch v1 is not registered"):
        build("nosuch", "1")
    with pytest.raises(BuildError, match=r"must be a number"):
        build(PIPELINE, "latest")
    with pytest.raises(BuildError, match=r"lower-case identifier"):
        build("../iris", "1")


def test_the_step_fails_with_the_reason_in_its_result(registry, tmp_path):
    from flywheel.core import steps
    from flywheel.serving.build import build

    result = tmp_path / "result.json"
    assert steps.main(build, ["--args", json.dumps({"pipeline": PIPELINE, "version": "999"}), "--result", str(result)])
    failed = steps.read(result)
    assert failed.status == steps.FAILED and "iris v999 is not registered" in failed.reason


def test_build_result_and_build_folder(registry, built):
    version = registry["version"]
    assert built["pipeline"] == PIPELINE
    assert built["version"] == version
    assert built["model_tag"] == f"iris:v{version}"
    assert built["bento_tag"] == f"flywheel-iris:v{version}"

    folder = registry["root"] / "state" / "bento-builds" / f"iris-v{version}"
    spec = json.loads((folder / "flywheel_model.json").read_text())
    assert spec["model_tag"] == built["model_tag"]
    assert spec["features"] == FEATURES
    assert spec["classes"] == ["setosa", "versicolor", "virginica"]
    assert spec["dataset"] == DATASET

    import bentoml

    bento = bentoml.bentos.get(built["bento_tag"])
    assert [str(m.tag) for m in bento.info.all_models] == [built["model_tag"]]
    assert bentoml.models.get(built["model_tag"]).info.metadata["dataset"]["etag"] == DATASET["etag"]


def test_rebuild_reuses_bento(registry, built, tmp_path):
    from flywheel.core import steps
    from flywheel.serving.build import build

    args = json.dumps({"pipeline": PIPELINE, "version": registry["version"]})
    assert steps.main(build, ["--args", args, "--result", str(tmp_path / "result.json")]) == 0
    again = steps.read(tmp_path / "result.json").payload
    assert {k: v for k, v in again.items() if k != "build_seconds"} == {
        k: v for k, v in built.items() if k != "build_seconds"
    }


# ---- serve ----------------------------------------------------------------------------------


def test_predicts_known_rows(server):
    version = server["registry"]["version"]
    response = _predict(
        server["client"], {"inputs": [row for row, _ in KNOWN]}, headers={"X-Request-Id": "test-req-42"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "predictions": [species for _, species in KNOWN],
        "model": {"pipeline": PIPELINE, "name": PIPELINE, "version": version},
        "dataset": DATASET,
    }
    assert response.headers["X-Model-Version"] == version
    assert response.headers["X-Model-Name"] == PIPELINE
    assert response.headers["X-Dataset-Version"] == DATASET["etag"]
    assert response.headers["X-Request-Id"] == "test-req-42"
    # The request id reaches the replica's request log (written once a second), to join Nginx's access log.
    log = server["requests_log"]
    deadline = time.monotonic() + 5
    while not (log.exists() and "request_id=test-req-42" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"request_id=test-req-42 model=iris:v{version} rows=3" in log.read_text()


@pytest.mark.parametrize("incoming", [None, "spaces are not echoed", "x" * 200])
def test_generates_request_id(server, incoming):
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    response = _predict(server["client"], {"inputs": [[5.1, 3.5, 1.4, 0.2]]}, headers=headers)
    assert response.status_code == 200
    assert len(response.headers["X-Request-Id"]) == 32
    assert response.headers["X-Request-Id"] != incoming


def test_integers_and_dict_rows(server):
    rows = [dict(zip(FEATURES, row, strict=True)) for row, _ in KNOWN]
    rows[0] = dict(reversed(list(rows[0].items())))  # key order does not matter
    response = _predict(server["client"], {"inputs": [*rows, [6, 3, 5, 2]]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][:3] == [species for _, species in KNOWN]


BAD_INPUTS = {
    "short row": ({"inputs": [[5.1, 3.5, 1.4]]}, "at least 4"),
    "long row": ({"inputs": [[5.1, 3.5, 1.4, 0.2, 9.9]]}, "at most 4"),
    "string value": ({"inputs": [[5.1, "3.5", 1.4, 0.2]]}, "valid number"),
    "boolean value": ({"inputs": [[5.1, True, 1.4, 0.2]]}, "valid number"),
    "nan": ('{"inputs": [[5.1, NaN, 1.4, 0.2]]}', "finite number"),
    "empty list": ({"inputs": []}, "at least 1"),
    "null inputs": ({"inputs": None}, "valid array"),
    "null row": ({"inputs": [None]}, "each row must be"),
    "flat list": ({"inputs": [5.1, 3.5, 1.4, 0.2]}, "each row must be"),
    "missing column": (
        {"inputs": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]},
        "missing columns ['petal_width']",
    ),
    "extra column": (
        {"inputs": [{**dict(zip(FEATURES, KNOWN[0][0], strict=True)), "colour": 1.0}]},
        "unexpected columns ['colour']",
    ),
    "too many rows": ({"inputs": [KNOWN[0][0]] * 1001}, "at most 1000"),
    "no inputs field": ({"rows": [KNOWN[0][0]]}, "inputs"),
    "invalid json": ('{"inputs": [[5.1, 3.5,', "Invalid JSON"),
    "empty body": ("", "inputs"),
}


@pytest.mark.parametrize("body,reason", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_400_with_reason(server, body, reason):
    response = _predict(server["client"], body)
    assert response.status_code == 400, response.text
    assert reason in json.dumps(response.json()), response.text


def test_still_serving_after_bad_inputs(server):
    response = _predict(server["client"], {"inputs": [KNOWN[2][0]]})
    assert response.status_code == 200
    assert response.json()["predictions"] == ["virginica"]


def test_the_port_refuses_connections_until_the_service_is_ready(registry, built, tmp_path):
    """A replica's port (flywheel/serving/replica.py) never takes a request it cannot answer yet: a
    connection is refused while the model loads, and the first one it accepts is answered. Under plain
    `bentoml serve` the arbiter listened first, and the first accepted requests waited for the worker."""
    import socket

    from bento_server import free_port, launch, stop

    port = free_port()
    proc = launch(built["bento_tag"], registry["env"], tmp_path / "serve.log", port)
    refused, deadline = 0, time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                refused += 1
                time.sleep(0.05)
                continue
            with conn:  # the first connection it accepted: answered, not held while the model loads
                conn.settimeout(2)
                conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: replica\r\nConnection: close\r\n\r\n")
                first_line = conn.recv(64).split(b"\r\n")[0]
            break
        else:
            pytest.fail(f"never accepted a connection:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
    finally:
        stop(proc)
    assert refused > 0  # it was starting, and said so by refusing
    assert first_line == b"HTTP/1.1 200 OK", first_line


def test_a_replica_is_the_worker_itself_without_modules_its_framework_never_serves_with(built, registry, tmp_path):
    """No arbiter process between supervisord and the worker (serving/replica.py), and an XGBoost Bento's
    replica has not loaded scikit-learn, which XGBoost imports only where it is installed (as in the ML
    environment). Read from the process itself: its children and the files it has mapped."""
    from bento_server import free_port, launch, stop

    port = free_port()
    proc = launch(built["bento_tag"], registry["env"], tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _ready(client):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
            answer = _predict(client, {"inputs": [row for row, _ in KNOWN]})
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        mapped = {line.split()[-1] for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines()}
    finally:
        stop(proc)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [species for _, species in KNOWN]
    assert children == []
    assert any("/xgboost/" in path for path in mapped)  # the model's library is loaded, in this process
    assert not [path for path in mapped if "/sklearn/" in path]


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False
