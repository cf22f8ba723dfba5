"""Which Airflow answers a retry can change (the bridge answers 503) and which it cannot (dead letter)."""

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowRejected, AirflowUnavailable, _check


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408, 401])
def test_transient_answers_are_retried(status):
    with pytest.raises(AirflowUnavailable):
        _check(httpx.Response(status, text="busy"), "POST /assets/events")


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_other_client_errors_are_final(status):
    with pytest.raises(AirflowRejected, match=f"answered {status}"):
        _check(httpx.Response(status, text="no"), "POST /assets/events")


def test_success_passes_through():
    r = httpx.Response(200, json={"id": 1})
    assert _check(r, "GET /x") is r
