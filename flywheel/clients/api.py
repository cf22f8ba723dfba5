"""The Flywheel client library: what a user (and the CLI, the deploy step, the benchmarks and the tests)
does with the platform from outside: upload a dataset, ask for predictions, wait for a version to serve.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from flywheel.clients import objectstore
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.core.settings import Settings
from flywheel.core.waiting import wait_until

READY_MARKER = "_SUCCESS"  # an IDX set is complete when this lands in its folder (core/pipelines.py)


class Client:
    """One user's view of a running platform (the settings' URLs; an API key if /predict wants one)."""

    def __init__(self, settings: Settings, api_key: str | None = None, timeout: float = 30) -> None:
        self.settings = settings
        self.api_key = api_key if api_key is not None else settings.client_api_key
        self.http = httpx.Client(base_url=settings.predict_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # --- datasets -----------------------------------------------------------------------------------

    def upload(self, path: Path, pipeline: str, key: str | None = None) -> dict:
        """Upload a file as datasets/<pipeline>/<key>; a folder (an IDX set) as datasets/<pipeline>/<key>/
        file by file, its `_SUCCESS` marker last, so the set's run starts once the set is whole.

        As a person does: with MinIO's root user (the platform's own identity only reads datasets).
        """
        client = objectstore.client(self.settings, root=True)
        name = key or path.name
        if path.is_dir():
            files = sorted(path.iterdir(), key=lambda f: (f.name == READY_MARKER, f.name))
            return {
                "set": f"{pipeline}/{name}",
                "objects": [self.upload(f, pipeline, f"{name}/{f.name}") for f in files],
            }
        result = client.fput_object(self.settings.datasets_bucket, f"{pipeline}/{name}", str(path))
        return {
            "bucket": self.settings.datasets_bucket,
            "key": f"{pipeline}/{name}",
            "etag": result.etag,
            "version_id": result.version_id,
        }

    # --- predictions --------------------------------------------------------------------------------

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if request_id:
            headers["X-Request-Id"] = request_id
        return headers

    def predict(self, rows: list, pipeline: str | None = None, request_id: str | None = None) -> httpx.Response:
        """POST rows to /<pipeline>/predict (the default pipeline's /predict when none is named)."""
        path = f"/{pipeline}/predict" if pipeline else "/predict"
        return self.http.post(path, json={"inputs": rows}, headers=self.headers(request_id))

    def feedback(self, pipeline: str, labels: dict[str, object]) -> httpx.Response:
        """The true outcome of earlier answers, by the request id they carried: POST /<pipeline>/feedback.
        Its answer says, per item, which were matched (services/inference/app.py)."""
        items = [{"request_id": rid, "label": label} for rid, label in labels.items()]
        return self.http.post(f"/{pipeline}/feedback", json={"feedback": items}, headers=self.headers())

    def served(self, pipeline: str, row: list) -> dict | None:
        """The answer to one row (its model and dataset), or None while nothing serves it."""
        try:
            r = self.predict([row], pipeline)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def served_version(self, pipeline: str, row: list) -> str | None:
        answer = self.served(pipeline, row)
        return str(answer["model"]["version"]) if answer else None

    def wait_for_version(
        self, pipeline: str, row: list, not_version: str | None, timeout: float = 600, progress=None, interval=1.0
    ) -> str:
        """Until a version other than `not_version` answers, asked every `interval` s; `progress` hears the
        DAG runs' states."""
        seen: dict[str, str] = {}
        airflow = AirflowAPI.connect(self.settings) if progress else None

        def report() -> None:
            for dag_id in (f"train_{pipeline}", f"deploy_{pipeline}"):
                try:
                    runs = airflow.dag_runs(dag_id, limit=1)
                except Exception:  # Airflow busy or restarting: the next poll reports
                    runs = []
                for run in runs:
                    if seen.get(run["dag_run_id"]) != run["state"]:
                        seen[run["dag_run_id"]] = run["state"]
                        progress(f"  {dag_id:<16} {run['dag_run_id']}: {run['state']}")

        def changed() -> str | None:
            if airflow is not None:
                report()
            version = self.served_version(pipeline, row)
            return version if version is not None and version != not_version else None

        try:
            return wait_until(
                changed,
                timeout,
                f"a {pipeline} version other than {not_version} served (DAG runs: {self.settings.airflow_url})",
                interval=interval,
            )
        finally:
            if airflow is not None:
                airflow.close()
