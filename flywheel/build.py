"""Build an immutable BentoML bento for one registered MLflow model version (`python -m flywheel.build`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from flywheel.settings import REPO_ROOT, Settings

logger = logging.getLogger("flywheel.build")

SERVICE_SOURCE = REPO_ROOT / "bento" / "service.py"
MODEL_FILE = "flywheel_model.json"
BOOSTER_FILE = "model.ubj"  # bento/service.py loads this name
DATASET_FIELDS = ("uri", "key", "etag", "version_id")
# Listed for a later `bentoml containerize`; nothing here is installed or locked at build time.
BENTO_PACKAGES = ("bentoml", "xgboost-cpu", "numpy", "pydantic")


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

    try:
        mv = MlflowClient().get_model_version(pipeline, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise BuildError(f"model version {pipeline} v{version} is not registered in MLflow") from exc
        raise BuildError(f"could not read model version {pipeline} v{version} from MLflow: {exc.message}") from exc
    tags = dict(mv.tags or {})
    required = ["flywheel.task", "flywheel.features"]
    if tags.get("flywheel.task") == "classification":
        required.append("flywheel.classes")
    missing = [name for name in required if not tags.get(name)]
    if missing:
        raise BuildError(f"model version {pipeline} v{version} lacks the tags {missing}")
    if tags["flywheel.task"] not in ("classification", "regression"):
        raise BuildError(f"model version {pipeline} v{version} has unknown task {tags['flywheel.task']!r}")
    try:
        features = json.loads(tags["flywheel.features"])
        classes = json.loads(tags.get("flywheel.classes") or "[]")
    except json.JSONDecodeError as exc:
        raise BuildError(f"model version {pipeline} v{version} has a tag that is not JSON: {exc}") from exc
    return {
        "model_tag": model_tag(pipeline, version),
        "pipeline": pipeline,
        "version": version,
        "features": [str(f) for f in features],
        "classes": [str(c) for c in classes],
        "task": tags["flywheel.task"],
        "dataset": {name: tags.get(f"dataset.{name}", "") for name in DATASET_FIELDS},
        "run_id": mv.run_id or "",
    }


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
    """Copy the booster from MLflow into the BentoML model store, once per tag."""
    import bentoml
    from bentoml.exceptions import BentoMLException

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
    info = {key: spec[key] for key in ("pipeline", "version", "task", "features", "classes", "dataset", "run_id")}
    info["xgboost_version"] = xgboost.__version__
    # A plain model-store entry, not bentoml.xgboost.save_model: that looks up the "xgboost"
    # distribution's version and fails when xgboost-cpu is what provides the package.
    try:
        with bentoml.models.create(
            tag, labels={"pipeline": spec["pipeline"], "mlflow-version": spec["version"]}, metadata=info
        ) as model:
            booster.save_model(model.path_of(BOOSTER_FILE))
    except BentoMLException:
        # A concurrent build of the same version may have saved it first; that copy is as good.
        if _in_store(bentoml.models.get, tag) is None:
            raise


def _bentofile(spec: dict[str, Any]) -> dict[str, Any]:
    def pinned(name: str) -> str:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return name

    return {
        "service": "service:Predictor",
        "name": f"flywheel-{spec['pipeline']}",
        "description": f"Serves {spec['model_tag']} (MLflow model {spec['pipeline']} version {spec['version']}).",
        "labels": {"pipeline": spec["pipeline"], "mlflow-version": spec["version"]},
        "include": ["service.py", MODEL_FILE],
        # Pin the exact model tag: a reference to ":latest" once served the wrong version.
        "models": [spec["model_tag"]],
        # Locking resolves against the package index (5-6 s, and fails offline); we serve from
        # this very venv, so the list only documents what a container would need.
        "python": {"packages": [pinned(name) for name in BENTO_PACKAGES], "lock_packages": False},
    }


def _write_build_folder(folder: Path, spec: dict[str, Any]) -> Path:
    import yaml

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy2(SERVICE_SOURCE, folder / "service.py")
    (folder / MODEL_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    bentofile = folder / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(_bentofile(spec), sort_keys=False))
    return bentofile


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
    _ensure_model(spec)
    tag = bento_tag(pipeline_name, version)
    if _in_store(bentoml.bentos.get, tag) is not None:
        logger.info("bento %s already built; reusing it", tag)
    else:
        bentofile = _write_build_folder(folder, spec)
        try:
            # In-process: 0.5 s, against 5 s for the `bentoml build` CLI, most of it imports.
            bentoml.bentos.build_bentofile(
                str(bentofile),
                build_ctx=str(folder),
                version=f"v{version}",
                # The service module is always named "service": re-import it, or a second build
                # in this process would package the first build's model tag.
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
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
