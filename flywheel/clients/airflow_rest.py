"""A small client for Airflow 3's public REST API (bearer token from the simple auth manager)."""

from __future__ import annotations

import httpx

from flywheel.core.settings import AIRFLOW_ADMIN, AirflowUser, Settings

# Answers a retry may change: Airflow busy, restarting or rate-limiting. Any other 4xx is final.
TRANSIENT = frozenset({408, 425, 429})


class AirflowUnavailable(RuntimeError):
    """Airflow could not take the call now; the caller should retry later."""


class AirflowRejected(RuntimeError):
    """Airflow refused the call for good (a 4xx no retry can change)."""


def _check(r: httpx.Response, what: str) -> httpx.Response:
    if r.status_code < 300:
        return r
    message = f"{what} answered {r.status_code}: {r.text[:200]}"
    if r.status_code >= 500 or r.status_code in TRANSIENT or r.status_code == 401:
        raise AirflowUnavailable(message)  # 401 after a fresh login: the password changed under us
    raise AirflowRejected(message)


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 10.0):
        self._base = base_url.rstrip("/")
        self._auth = {"username": username, "password": password}
        self._client = httpx.Client(base_url=self._base, timeout=timeout)
        self._token: str | None = None

    @classmethod
    def connect(cls, settings: Settings, user: AirflowUser = AIRFLOW_ADMIN) -> AirflowAPI:
        """A client of the Airflow API these settings name, logged in as `user` (core/settings.py)."""
        return cls(settings.airflow_url, user.name, settings.secrets[user.secret])

    def __enter__(self) -> AirflowAPI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _login(self) -> str:
        try:
            r = self._client.post("/auth/token", json=self._auth)
        except httpx.TransportError as exc:
            raise AirflowUnavailable(f"Airflow API unreachable at {self._base}: {exc}") from exc
        return _check(r, "POST /auth/token").json()["access_token"]

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            for attempt in range(2):
                if self._token is None:
                    self._token = self._login()
                headers = {"Authorization": f"Bearer {self._token}"}
                r = self._client.request(method, f"/api/v2{path}", headers=headers, **kwargs)
                if r.status_code == 401 and attempt == 0:
                    self._token = None  # expired: log in again once
                    continue
                return r
        except httpx.TransportError as exc:
            raise AirflowUnavailable(f"Airflow API unreachable at {self._base}: {exc}") from exc
        return r

    def get(self, path: str, **params) -> dict:
        return _check(self.request("GET", path, params=params), f"GET {path}").json()

    def asset_id(self, uri: str) -> int | None:
        """Airflow's POST /assets/events takes an id, not a URI (apache/airflow#53615)."""
        for asset in self.get("/assets", uri_pattern=uri, limit=100)["assets"]:
            if asset["uri"] == uri:
                return asset["id"]
        return None

    def create_asset_event(self, asset_id: int, extra: dict) -> dict:
        r = self.request("POST", "/assets/events", json={"asset_id": asset_id, "extra": extra})
        return _check(r, "POST /assets/events").json()

    def asset_events(self, uri: str, limit: int = 100) -> list[dict]:
        asset_id = self.asset_id(uri)
        if asset_id is None:
            return []
        return self.get("/assets/events", asset_id=asset_id, limit=limit, order_by="-timestamp")["asset_events"]

    def dag_runs(self, dag_id: str, limit: int = 100, states: tuple[str, ...] = ()) -> list[dict]:
        """Newest first; only those in `states` if given (queued, running, success, failed)."""
        params = {"limit": limit, "order_by": "-id"}
        if states:
            params["state"] = list(states)
        return self.get(f"/dags/{dag_id}/dagRuns", **params)["dag_runs"]

    def trigger(self, dag_id: str, conf: dict) -> dict:
        """A manual run of the DAG with this conf (Airflow checks it against the DAG's params: a 400 names why)."""
        r = self.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        return _check(r, f"POST /dags/{dag_id}/dagRuns").json()

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def close(self) -> None:
        self._client.close()
