"""Build (a step): an immutable BentoML bento for one registered MLflow model version.

`python -m flywheel.serving.build --args '{"pipeline": "iris", "version": "3"}'` builds (or reuses)
bento `flywheel-<pipeline>:v<version>`: the model copied from MLflow into BentoML's model store by
its framework (flywheel/frameworks/), and the framework's service from bento/ with the version's
contract beside it (flywheel_model.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flywheel import frameworks
from flywheel.clients.tracking import client as tracking_client
from flywheel.core import pipelines, schema, steps
from flywheel.core.settings import REPO_ROOT, Settings

logger = logging.getLogger("flywheel.build")

BENTO_SOURCES = REPO_ROOT / "bento"
MODEL_FILE = "flywheel_model.json"  # the version's contract, beside the service in each build folder
# Every service imports this module; it is copied beside the service into each build folder.
SHARED_SOURCE = BENTO_SOURCES / "provenance.py"


class BuildError(RuntimeError):
    """A build that cannot go ahead; the message names the pipeline and version."""


def model_tag(pipeline: str, version: str) -> str:
    return f"{pipeline}:v{version}"


def bento_tag(pipeline: str, version: str) -> str:
    return f"flywheel-{pipeline}:v{version}"


def read_spec(pipeline: str, version: str) -> dict[str, Any]:
    """What the service needs to know (flywheel_model.json), from the model version's tags in MLflow."""
    from mlflow.exceptions import MlflowException

    try:
        mv = tracking_client().get_model_version(pipeline, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise BuildError(f"model version {pipeline} v{version} is not registered in MLflow") from exc
        raise BuildError(f"could not read model version {pipeline} v{version} from MLflow: {exc.message}") from exc
    record = schema.VersionRecord.from_mlflow(pipeline, version, mv.run_id, dict(mv.tags or {}))
    try:
        contract = record.contract()
    except schema.SchemaError as exc:
        raise BuildError(str(exc)) from exc
    if contract.framework not in frameworks.names():
        raise BuildError(
            f"{record.where} has framework {contract.framework!r}; this build serves {list(frameworks.names())}"
        )
    if contract.task not in frameworks.get(contract.framework).tasks:
        raise BuildError(f"{record.where}: framework {contract.framework} does not do {contract.task}")
    upload = record.upload
    return {
        "model_tag": model_tag(pipeline, version),
        "pipeline": pipeline,
        "version": str(version),
        "run_id": record.run_id,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(contract).items()},
        "dataset": upload.answer() if upload else {},
    }


def example_input(spec: dict[str, Any]) -> list:
    """One valid input for the bento's /predict (zeros)."""
    if spec.get("image_shape"):
        height, width = spec["image_shape"]
        return [[0.0] * width for _ in range(height)]
    return [0.0] * len(spec["features"])


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
    framework = frameworks.get(spec["framework"])
    contract = schema.Contract(
        framework=spec["framework"],
        task=spec["task"],
        metric=spec["metric"],
        features=tuple(spec["features"]),
        image_shape=tuple(spec["image_shape"]),
        max_value=spec["max_value"],
        classes=tuple(spec["classes"]),
    )
    info = {key: spec[key] for key in ("pipeline", "version", "framework", "task", "classes", "dataset", "run_id")}
    try:
        with bentoml.models.create(
            tag, labels={"pipeline": spec["pipeline"], "mlflow-version": spec["version"]}, metadata=info
        ) as model:
            try:
                framework.store(f"models:/{spec['pipeline']}/{spec['version']}", contract, Path(model.path), where)
            except ValueError as exc:
                raise BuildError(str(exc)) from exc
    except BentoMLException:
        # A concurrent build of the same version may have saved it first; that copy is as good.
        if _in_store(bentoml.models.get, tag) is None:
            raise


def _bentofile(spec: dict[str, Any]) -> dict[str, Any]:
    framework = frameworks.get(spec["framework"])
    source, service = framework.service
    return {
        "service": f"{Path(source).stem}:{service}",
        "name": f"flywheel-{spec['pipeline']}",
        "description": f"Serves {spec['model_tag']} (MLflow model {spec['pipeline']} version {spec['version']}).",
        "labels": {"pipeline": spec["pipeline"], "mlflow-version": spec["version"], "framework": spec["framework"]},
        "include": [source, SHARED_SOURCE.name, MODEL_FILE],
        # Pin the exact model tag: a reference to ":latest" once served the wrong version.
        "models": [spec["model_tag"]],
        # Locking resolves against the package index (5-6 s, and fails offline); we serve from
        # this very venv, so the list only documents what a container would need.
        "python": {"packages": frameworks.pinned(*framework.packages), "lock_packages": False},
    }


def _write_build_folder(folder: Path, spec: dict[str, Any]) -> Path:
    import yaml

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    source = BENTO_SOURCES / frameworks.get(spec["framework"]).service[0]
    shutil.copy2(source, folder / source.name)
    shutil.copy2(SHARED_SOURCE, folder / SHARED_SOURCE.name)
    (folder / MODEL_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    bentofile = folder / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(_bentofile(spec), sort_keys=False))
    return bentofile


def _batching(settings: Settings, pipeline_name: str) -> bool:
    """The pipeline's `serving.batching`; it is written into the bento, so a bento never changes."""
    try:
        return pipelines.get(settings.pipelines_dir, pipeline_name).batching
    except pipelines.PipelineError:
        return False


def build(pipeline: str, version: str) -> dict[str, Any]:
    """Build (or reuse) bento `flywheel-<pipeline>:v<version>` serving MLflow model <pipeline> v<version>."""
    started = time.perf_counter()
    version = str(version).strip()
    if not pipeline.isidentifier() or pipeline != pipeline.lower():
        # It names a folder and BentoML tags; pipeline files enforce the same rule.
        raise BuildError(f"pipeline name must be a lower-case identifier, got {pipeline!r} (version {version})")
    if not version.isdigit():
        raise BuildError(f"model version for {pipeline} must be a number, got {version!r}")
    settings = Settings.load()
    # BentoML reads BENTOML_HOME once, on first use of a store; default it to the stack's own.
    os.environ.setdefault("BENTOML_HOME", str(settings.bentoml_home))
    home = Path(os.environ["BENTOML_HOME"]).resolve()
    folder = settings.state / "bento-builds" / f"{pipeline}-v{version}"
    if home == folder.resolve() or folder.resolve() in home.parents:
        # A store inside the build context gets copied into the bento, recursively.
        raise BuildError(f"BENTOML_HOME {home} must not be inside the build folder {folder}")

    import bentoml
    from bentoml.exceptions import BentoMLException

    spec = read_spec(pipeline, version)
    spec["batching"] = _batching(settings, pipeline)
    # The largest legal request, the number Nginx's body limit is sized from (platform/routes.py).
    spec["max_inputs"] = frameworks.get(spec["framework"]).max_inputs
    _ensure_model(spec)
    tag = bento_tag(pipeline, version)
    if _in_store(bentoml.bentos.get, tag) is not None:
        logger.info("bento %s already built; reusing it", tag)
    else:
        bentofile = _write_build_folder(folder, spec)
        # `reload` below re-imports the service module only; the shared module it imports would
        # keep the first build's flywheel_model.json in this process.
        sys.modules.pop(SHARED_SOURCE.stem, None)
        try:
            # In-process: 0.5 s, against 5 s for the `bentoml build` CLI, most of it imports.
            # Our stdout is the task log's: bentoml prints its banner there.
            with contextlib.redirect_stdout(sys.stderr):
                bentoml.bentos.build_bentofile(
                    str(bentofile),
                    build_ctx=str(folder),
                    version=f"v{version}",
                    # Service modules keep their names ("table_service", "image_service"): re-import
                    # them, or a second build in this process would package the first build's model tag.
                    reload=True,
                )
        except BentoMLException as exc:
            if _in_store(bentoml.bentos.get, tag) is None:  # else a concurrent build won the race
                raise BuildError(f"bento build for {pipeline} v{version} failed: {exc}") from exc
    return {
        "pipeline": pipeline,
        "version": version,
        "model_tag": spec["model_tag"],
        "bento_tag": tag,
        "framework": spec["framework"],
        # One valid input for a quick probe: {"inputs": [example]}.
        "example": example_input(spec),
        "build_seconds": round(time.perf_counter() - started, 3),
    }


if __name__ == "__main__":
    sys.exit(steps.main(build))
