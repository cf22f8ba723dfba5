"""A small client for the MLflow server's REST API, for Airflow's environment (which has no mlflow)."""

from __future__ import annotations

import httpx


class MlflowAPI:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        r = self._client.request(method, f"/api/2.0/mlflow{path}", **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"MLflow {method} {path} answered {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else {}

    def model_version(self, name: str, version: str) -> dict:
        mv = self._call("GET", "/model-versions/get", params={"name": name, "version": version})["model_version"]
        mv["tags"] = {t["key"]: t["value"] for t in mv.get("tags", [])}
        return mv

    def version_by_alias(self, name: str, alias: str) -> str | None:
        r = self._client.get("/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": alias})
        return r.json()["model_version"]["version"] if r.status_code == 200 else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call("POST", "/registered-models/alias", json={"name": name, "alias": alias, "version": version})

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call(
            "POST", "/model-versions/set-tag", json={"name": name, "version": version, "key": key, "value": value}
        )

    def run_artifact(self, run_id: str, path: str) -> bytes:
        """A file the run logged (served through the tracking server's artifact proxy)."""
        r = self._client.get("/get-artifact", params={"path": path, "run_uuid": run_id})
        if r.status_code >= 300:
            raise RuntimeError(f"MLflow has no artifact {path} for run {run_id}: HTTP {r.status_code}")
        return r.content

    def close(self) -> None:
        self._client.close()
