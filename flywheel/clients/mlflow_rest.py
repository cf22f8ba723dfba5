"""A small client for the MLflow server's REST API, for Airflow's environment (which has no mlflow)."""

from __future__ import annotations

import json

import httpx

from flywheel.core.settings import MLFLOW_SERVICE_USER, Settings


def _tags(entity: dict) -> dict:
    """MLflow's [{key, value}] tag lists as a dict, in place."""
    entity["tags"] = {t["key"]: t["value"] for t in entity.get("tags", []) if isinstance(t, dict)}
    return entity


class MlflowAPI:
    def __init__(self, base_url: str, auth: tuple[str, str] | None = None, timeout: float = 30.0):
        self._client = httpx.Client(base_url=base_url.rstrip("/"), auth=auth, timeout=timeout)

    @classmethod
    def connect(cls, settings: Settings) -> MlflowAPI:
        """The platform's client of the tracking server these settings name, as its service account."""
        return cls(settings.mlflow_url, auth=(MLFLOW_SERVICE_USER, settings.secrets["MLFLOW_TRACKING_PASSWORD"]))

    def __enter__(self) -> MlflowAPI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        r = self._client.request(method, f"/api/2.0/mlflow{path}", **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"MLflow {method} {path} answered {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else {}

    def model_version(self, name: str, version: str) -> dict:
        return _tags(
            self._call("GET", "/model-versions/get", params={"name": name, "version": version})["model_version"]
        )

    def version_by_alias(self, name: str, alias: str) -> str | None:
        r = self._client.get("/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": alias})
        return r.json()["model_version"]["version"] if r.status_code == 200 else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call("POST", "/registered-models/alias", json={"name": name, "alias": alias, "version": version})

    def delete_alias(self, name: str, alias: str) -> None:
        self._call("DELETE", "/registered-models/alias", json={"name": name, "alias": alias})

    def versions(self, name: str) -> list[dict]:
        """Every version of a registered model, newest first, each with its tags as a dict."""
        found = self._call(
            "GET", "/model-versions/search", params={"filter": f"name='{name}'", "max_results": 10000}
        ).get("model_versions", [])
        return sorted((_tags(v) for v in found), key=lambda v: int(v["version"]), reverse=True)

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call(
            "POST", "/model-versions/set-tag", json={"name": name, "version": version, "key": key, "value": value}
        )

    def run(self, run_id: str) -> dict:
        """One run: {"info", "data": {"tags": {...}, "metrics": {...}}}."""
        run = self._call("GET", "/runs/get", params={"run_id": run_id})["run"]
        data = run.setdefault("data", {})
        _tags(data)
        data["metrics"] = {m["key"]: m["value"] for m in data.get("metrics", []) if isinstance(m, dict)}
        return run

    def run_artifact(self, run_id: str, path: str) -> bytes:
        """A file the run logged (served through the tracking server's artifact proxy)."""
        r = self._client.get("/get-artifact", params={"path": path, "run_uuid": run_id})
        if r.status_code >= 300:
            raise RuntimeError(f"MLflow has no artifact {path} for run {run_id}: HTTP {r.status_code}")
        return r.content

    # --- runs: what Airflow's side records (the uploads ledger) -----------------------------------

    def experiment_id(self, name: str, create: bool = False) -> str | None:
        r = self._client.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        if r.status_code == 200:
            return r.json()["experiment"]["experiment_id"]
        if not create:
            return None
        return self._call("POST", "/experiments/create", json={"name": name})["experiment_id"]

    def search_runs(
        self, experiment: str, filter_string: str = "", order_by: tuple[str, ...] = (), max_results: int = 100
    ) -> list[dict]:
        """Runs of the named experiment ([] if it does not exist), each {"info", "data": {"tags": {...}}}."""
        experiment_id = self.experiment_id(experiment)
        if experiment_id is None:
            return []
        body = {
            "experiment_ids": [experiment_id],
            "filter": filter_string,
            "order_by": list(order_by),
            "max_results": max_results,
        }
        runs = self._call("POST", "/runs/search", json=body).get("runs", [])
        for run in runs:
            _tags(run.setdefault("data", {}))
        return runs

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str]) -> dict:
        body = {
            "experiment_id": self.experiment_id(experiment, create=True),
            "run_name": run_name,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        return self._call("POST", "/runs/create", json=body)["run"]

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call(
            "POST",
            "/runs/log-batch",
            json={"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags.items()]},
        )

    def end_run(self, run_id: str, status: str) -> None:
        """FINISHED, FAILED or KILLED, with an end time."""
        import time

        self._call(
            "POST", "/runs/update", json={"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)}
        )

    def log_json(self, run: dict, path: str, value) -> None:
        """A JSON artifact of the run, through the tracking server's artifact proxy."""
        root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
        r = self._client.put(f"/api/2.0/mlflow-artifacts/artifacts/{root}/{path}", content=json.dumps(value, indent=1))
        if r.status_code >= 300:
            raise RuntimeError(f"MLflow could not store {path} for run {run['info']['run_id']}: HTTP {r.status_code}")

    def close(self) -> None:
        self._client.close()
