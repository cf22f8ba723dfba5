"""Build an immutable BentoML bento for one registered MLflow model version (`python -m flywheel.build`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flywheel import routes
from flywheel.runner import emit
from flywheel.settings import REPO_ROOT, Settings

logger = logging.getLogger("flywheel.build")

MODEL_FILE = "flywheel_model.json"
BOOSTER_FILE = "model.ubj"  # bento/service.py loads this name
KERAS_FILE = "model.keras"  # bento/image_service.py loads this name
DATASET_FIELDS = ("uri", "key", "etag", "version_id")
# Versions without a framework tag predate image models: they are XGBoost.
DEFAULT_FRAMEWORK = "xgboost"


@dataclass(frozen=True)
class Serving:
    """How a framework's models are served: the service file and the packages it imports."""

    source: Path
    service: str
    # Listed for a later `bentoml containerize`; nothing here is installed or locked at build time.
    packages: tuple[str, ...]


# Every service imports this module; it is copied beside the service into each build folder.
SHARED_SOURCE = REPO_ROOT / "bento" / "provenance.py"
SERVING = {
    "xgboost": Serving(
        REPO_ROOT / "bento" / "service.py", "Predictor", ("bentoml", "xgboost-cpu", "numpy", "pydantic")
    ),
    "tensorflow": Serving(
        REPO_ROOT / "bento" / "image_service.py",
        "ImagePredictor",
        ("bentoml", "tensorflow-cpu", "keras", "numpy", "pydantic"),
    ),
}


class BuildError(RuntimeError):
    """A build that cannot go ahead; the message names the pipeline and version."""


def model_tag(pipeline: str, version: str) -> str:
    return f"{pipeline}:v{version}"


def bento_tag(pipeline: str, version: str) -> str:
    return f"flywheel-{pipeline}:v{version}"


def _read_spec(pipeline: str, version: str) -> dict[str, Any]:
    """What the service needs to know, from the model version's tags in MLflow."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from flywheel.registry import require_tracking

    require_tracking()
    try:
        mv = MlflowClient().get_model_version(pipeline, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise BuildError(f"model version {pipeline} v{version} is not registered in MLflow") from exc
        raise BuildError(f"could not read model version {pipeline} v{version} from MLflow: {exc.message}") from exc
    tags = dict(mv.tags or {})
    where = f"model version {pipeline} v{version}"
    framework = tags.get("flywheel.framework") or DEFAULT_FRAMEWORK
    if framework not in SERVING:
        raise BuildError(f"{where} has framework {framework!r}; this build serves {sorted(SERVING)}")
    required = ["flywheel.task"]
    required += ["flywheel.image_shape", "flywheel.max_value"] if framework == "tensorflow" else ["flywheel.features"]
    if tags.get("flywheel.task") == "classification" or framework == "tensorflow":
        required.append("flywheel.classes")
    missing = [name for name in required if not tags.get(name)]
    if missing:
        raise BuildError(f"{where} lacks the tags {missing}")
    if tags["flywheel.task"] not in ("classification", "regression"):
        raise BuildError(f"{where} has unknown task {tags['flywheel.task']!r}")
    if framework == "tensorflow" and tags["flywheel.task"] != "classification":
        raise BuildError(f"{where}: image models classify, but the task tag is {tags['flywheel.task']!r}")
    try:
        parsed = {name: json.loads(tags[name]) for name in required if name != "flywheel.task"}
    except json.JSONDecodeError as exc:
        raise BuildError(f"{where} has a tag that is not JSON: {exc}") from exc
    spec = {
        "model_tag": model_tag(pipeline, version),
        "pipeline": pipeline,
        "version": version,
        "framework": framework,
        "classes": [str(c) for c in parsed.get("flywheel.classes", [])],
        "task": tags["flywheel.task"],
        "dataset": {name: tags.get(f"dataset.{name}", "") for name in DATASET_FIELDS},
        "run_id": mv.run_id or "",
    }
    if framework == "tensorflow":
        shape, max_value = parsed["flywheel.image_shape"], parsed["flywheel.max_value"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
            raise BuildError(f"{where}: tag flywheel.image_shape is {shape!r}, expected [height, width]")
        if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not 0 < max_value < math.inf:
            raise BuildError(f"{where}: tag flywheel.max_value is {max_value!r}, expected a positive number")
        if len(spec["classes"]) < 2:
            raise BuildError(f"{where}: tag flywheel.classes lists {spec['classes']}, expected at least 2 classes")
        spec.update(image_shape=shape, max_value=float(max_value))
    else:
        spec["features"] = [str(f) for f in parsed["flywheel.features"]]
    return spec


def example_input(spec: dict[str, Any]) -> list:
    """One valid input for the bento's /predict (zeros), for the deploy step's smoke test."""
    if spec["framework"] == "tensorflow":
        height, width = spec["image_shape"]
        return [[0.0] * width for _ in range(height)]
    return [0.0] * len(spec["features"])


def _check_booster(booster: Any, spec: dict[str, Any]) -> None:
    """Catch a model that disagrees with its own tags now, not on the first request."""
    where = f"model version {spec['pipeline']} v{spec['version']}"
    if booster.feature_names and list(booster.feature_names) != spec["features"]:
        raise BuildError(f"{where}: booster features {booster.feature_names} differ from tag {spec['features']}")
    if spec["task"] != "classification":
        return
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    num_class = int(learner["learner_model_param"].get("num_class", "0"))
    expected = 2 if objective.startswith("binary:") else num_class
    if expected != len(spec["classes"]):
        raise BuildError(
            f"{where}: objective {objective} predicts {expected} classes but the tag lists {spec['classes']}"
        )


def _in_store(get: Any, tag: str) -> Any:
    """The store item with this tag, or None."""
    from bentoml.exceptions import NotFound

    try:
        return get(tag)
    except NotFound:
        return None


def _ensure_model(spec: dict[str, Any]) -> None:
    """Copy the model from MLflow into the BentoML model store, once per tag."""
    import bentoml

    tag, where = spec["model_tag"], f"model version {spec['pipeline']} v{spec['version']}"
    stored = _in_store(bentoml.models.get, tag)
    if stored is not None:
        if stored.info.metadata.get("run_id") == spec["run_id"]:
            return
        # Same tag, other run: the MLflow registry was reset and numbers restarted. Reusing the
        # old copy would serve a model MLflow no longer knows under this version.
        logger.warning("%s is run %s now; replacing the stale %s and its bento", where, spec["run_id"], tag)
        if _in_store(bentoml.bentos.get, bento_tag(spec["pipeline"], spec["version"])) is not None:
            bentoml.bentos.delete(bento_tag(spec["pipeline"], spec["version"]))
        bentoml.models.delete(tag)
    if spec["framework"] == "tensorflow":
        _store_keras(spec, tag, where)
    else:
        _store_booster(spec, tag, where)


def _store(spec: dict[str, Any], tag: str, info: dict[str, Any], write: Any) -> None:
    """A plain model-store entry, filled by `write(model)` (which saves files under model.path_of)."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        with bentoml.models.create(
            tag, labels={"pipeline": spec["pipeline"], "mlflow-version": spec["version"]}, metadata=info
        ) as model:
            write(model)
    except BentoMLException:
        # A concurrent build of the same version may have saved it first; that copy is as good.
        if _in_store(bentoml.models.get, tag) is None:
            raise


def _store_booster(spec: dict[str, Any], tag: str, where: str) -> None:
    # Imported only now: xgboost (and the sklearn it pulls in) costs seconds a reused build skips.
    import mlflow.xgboost
    import xgboost

    try:
        booster = mlflow.xgboost.load_model(f"models:/{spec['pipeline']}/{spec['version']}")
    except Exception as exc:
        raise BuildError(f"could not load {where} from MLflow: {exc}") from exc
    if not isinstance(booster, xgboost.Booster):
        booster = booster.get_booster()
    _check_booster(booster, spec)
    info = {
        key: spec[key]
        for key in ("pipeline", "version", "framework", "task", "features", "classes", "dataset", "run_id")
    }
    info["xgboost_version"] = xgboost.__version__
    # Not bentoml.xgboost.save_model: that looks up the "xgboost" distribution's version and
    # fails when xgboost-cpu is what provides the package.
    _store(spec, tag, info, lambda model: booster.save_model(model.path_of(BOOSTER_FILE)))


def _keras_io(path: Path) -> tuple[list | None, int | None]:
    """Input shape (batch first) and output units from a .keras file's config, without Keras.

    A .keras file is a zip whose config.json describes the layers; reading it spares the build
    TensorFlow's import (10+ s here). (None, None) when the layout is not the expected one.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        inner = config["config"]
        layers = {layer["name"]: layer for layer in inner["layers"]}
        (first,) = [layers[name] for name, *_ in _listed(inner["input_layers"])]
        (last,) = [layers[name] for name, *_ in _listed(inner["output_layers"])]
        return list(first["config"]["batch_shape"]), int(last["config"]["units"])
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile):
        return None, None


def _listed(refs: list) -> list:
    # Keras writes one input as ["name", 0, 0] and several as [["name", 0, 0], ...].
    return [refs] if refs and isinstance(refs[0], str) else refs


def _check_keras(input_shape: list | None, units: int | None, spec: dict[str, Any], where: str) -> None:
    """Catch a model that disagrees with its own tags now, not on the first request."""
    if input_shape is not None and list(input_shape[1:]) != list(spec["image_shape"]):
        raise BuildError(
            f"{where}: the model takes images of shape {input_shape[1:]} but the tag says {spec['image_shape']}"
        )
    if units is not None and units != len(spec["classes"]):
        raise BuildError(f"{where}: the model predicts {units} classes but the tag lists {spec['classes']}")


def _store_keras(spec: dict[str, Any], tag: str, where: str) -> None:
    import mlflow.artifacts

    info = {
        key: spec[key]
        for key in (
            "pipeline",
            "version",
            "framework",
            "task",
            "image_shape",
            "max_value",
            "classes",
            "dataset",
            "run_id",
        )
    }
    with tempfile.TemporaryDirectory(prefix="flywheel-build-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(f"models:/{spec['pipeline']}/{spec['version']}", dst_path=tmp)
            )
        except Exception as exc:
            raise BuildError(f"could not download {where} from MLflow: {exc}") from exc
        # Both MLflow flavors that hold a Keras 3 model (tensorflow, keras) keep it in this file.
        keras_file = local / "data" / KERAS_FILE
        if not keras_file.is_file():
            raise BuildError(
                f"{where} has no data/{KERAS_FILE}: not a Keras 3 model as flywheel.frameworks.tensorflow logs it"
            )
        input_shape, units = _keras_io(keras_file)
        if input_shape is None or units is None:
            # Not the functional layout our CNN has; the smoke test still proves it serves.
            logger.warning(
                "%s: cannot read input shape and classes from %s; not checked against the tags", where, KERAS_FILE
            )
        _check_keras(input_shape, units, spec, where)
        # The very file MLflow holds: no TensorFlow import (10+ s here) to load and re-save it.
        _store(spec, tag, info, lambda model: shutil.copyfile(keras_file, model.path_of(KERAS_FILE)))


def _bentofile(spec: dict[str, Any]) -> dict[str, Any]:
    def pinned(name: str) -> str:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return name

    serving = SERVING[spec["framework"]]
    return {
        "service": f"{serving.source.stem}:{serving.service}",
        "name": f"flywheel-{spec['pipeline']}",
        "description": f"Serves {spec['model_tag']} (MLflow model {spec['pipeline']} version {spec['version']}).",
        "labels": {"pipeline": spec["pipeline"], "mlflow-version": spec["version"], "framework": spec["framework"]},
        "include": [serving.source.name, SHARED_SOURCE.name, MODEL_FILE],
        # Pin the exact model tag: a reference to ":latest" once served the wrong version.
        "models": [spec["model_tag"]],
        # Locking resolves against the package index (5-6 s, and fails offline); we serve from
        # this very venv, so the list only documents what a container would need.
        "python": {"packages": [pinned(name) for name in serving.packages], "lock_packages": False},
    }


def _write_build_folder(folder: Path, spec: dict[str, Any]) -> Path:
    import yaml

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    source = SERVING[spec["framework"]].source
    shutil.copy2(source, folder / source.name)
    shutil.copy2(SHARED_SOURCE, folder / SHARED_SOURCE.name)
    (folder / MODEL_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    bentofile = folder / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(_bentofile(spec), sort_keys=False))
    return bentofile


def _batching(settings: Settings, pipeline_name: str) -> bool:
    """The pipeline's `serving.batching`; it is written into the bento, so a bento never changes."""
    from flywheel import pipelines

    try:
        return pipelines.get(settings.pipelines_dir, pipeline_name).batching
    except pipelines.PipelineError:
        return False


def build(pipeline_name: str, version: str) -> dict[str, Any]:
    """Build (or reuse) bento `flywheel-<pipeline>:v<version>` serving MLflow model <pipeline> v<version>."""
    started = time.perf_counter()
    version = str(version).strip()
    if not pipeline_name.isidentifier() or pipeline_name != pipeline_name.lower():
        # It names a folder and BentoML tags; pipeline files enforce the same rule.
        raise BuildError(f"pipeline name must be a lower-case identifier, got {pipeline_name!r} (version {version})")
    if not version.isdigit():
        raise BuildError(f"model version for {pipeline_name} must be a number, got {version!r}")
    settings = Settings.load()
    # BentoML reads BENTOML_HOME once, on first use of a store; default it to the stack's own.
    os.environ.setdefault("BENTOML_HOME", str(settings.bentoml_home))
    home = Path(os.environ["BENTOML_HOME"]).resolve()
    folder = settings.state / "bento-builds" / f"{pipeline_name}-v{version}"
    if home == folder.resolve() or folder.resolve() in home.parents:
        # A store inside the build context gets copied into the bento, recursively.
        raise BuildError(f"BENTOML_HOME {home} must not be inside the build folder {folder}")

    import bentoml
    from bentoml.exceptions import BentoMLException

    spec = _read_spec(pipeline_name, version)
    spec["batching"] = _batching(settings, pipeline_name)
    # The largest legal request, the number Nginx's body limit is sized from (flywheel/routes.py).
    spec["max_inputs"] = routes.MAX_IMAGES if spec["framework"] == "tensorflow" else routes.MAX_ROWS
    _ensure_model(spec)
    tag = bento_tag(pipeline_name, version)
    if _in_store(bentoml.bentos.get, tag) is not None:
        logger.info("bento %s already built; reusing it", tag)
    else:
        bentofile = _write_build_folder(folder, spec)
        # `reload` below re-imports the service module only; the shared module it imports would
        # keep the first build's flywheel_model.json in this process.
        sys.modules.pop(SHARED_SOURCE.stem, None)
        try:
            # In-process: 0.5 s, against 5 s for the `bentoml build` CLI, most of it imports.
            bentoml.bentos.build_bentofile(
                str(bentofile),
                build_ctx=str(folder),
                version=f"v{version}",
                # Service modules keep their names ("service", "image_service"): re-import them, or
                # a second build in this process would package the first build's model tag.
                reload=True,
            )
        except BentoMLException as exc:
            if _in_store(bentoml.bentos.get, tag) is None:  # else a concurrent build won the race
                raise BuildError(f"bento build for {pipeline_name} v{version} failed: {exc}") from exc
    return {
        "pipeline": pipeline_name,
        "version": version,
        "model_tag": spec["model_tag"],
        "bento_tag": tag,
        "framework": spec["framework"],
        # One valid input row for the deploy step's smoke test: it posts {"inputs": [example]}.
        "example": example_input(spec),
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.build", description=__doc__)
    parser.add_argument("--pipeline", required=True, help="pipeline name = registered MLflow model name")
    parser.add_argument("--version", required=True, help="MLflow model version number")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        # Callers parse the last stdout line as the result, so nothing else may print there.
        with contextlib.redirect_stdout(sys.stderr):
            result = build(args.pipeline, args.version)
    except BuildError as exc:
        print(f"flywheel.build: error: {exc}", file=sys.stderr)
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
