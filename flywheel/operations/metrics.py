"""Serving metrics: per-pipeline request rate, error rate and p99 latency, queried from Prometheus."""

from __future__ import annotations

import httpx

from flywheel.clients import prometheus
from flywheel.core.settings import Settings

# Every metric name dashboards and rules may use: the Bentos' own, the Nginx exporter's, the events
# bridge's, the inference service's and Prometheus' `up`. The embedded e2e test checks that the live
# stack exports each of them.
EXPORTED = frozenset(
    {
        "bentoml_service_request_duration_seconds_bucket",
        "bentoml_service_request_duration_seconds_sum",
        "bentoml_service_request_duration_seconds_count",
        "bentoml_service_request_total",
        "bentoml_service_request_in_progress",
        "bentoml_service_last_request_timestamp_seconds",
        "nginx_up",
        "nginx_connections_accepted",
        "nginx_connections_active",
        "nginx_connections_handled",
        "nginx_connections_reading",
        "nginx_connections_waiting",
        "nginx_connections_writing",
        "nginx_http_requests_total",
        "up",
        "flywheel_bridge_dead_letters",
        "flywheel_bridge_events_total",
        "flywheel_live_score",
        "flywheel_inference_unshipped",
        "flywheel_inference_dropped_total",
        "flywheel_drift_score",
        "flywheel_drift_detected",
        "flywheel_drift_window_rows",
    }
)
WINDOW = "1m"
QUERIES = {
    "rps": f'sum by (pipeline) (rate(bentoml_service_request_total{{endpoint="/predict"}}[{WINDOW}]))',
    "error_rate": (
        "sum by (pipeline) (rate(bentoml_service_request_total"
        f'{{endpoint="/predict",http_response_code!~"2.."}}[{WINDOW}]))'
        f' / sum by (pipeline) (rate(bentoml_service_request_total{{endpoint="/predict"}}[{WINDOW}]))'
    ),
    "p99_ms": (
        "1000 * histogram_quantile(0.99, sum by (pipeline, le) "
        f'(rate(bentoml_service_request_duration_seconds_bucket{{endpoint="/predict"}}[{WINDOW}])))'
    ),
}


def by_pipeline(settings: Settings) -> dict[str, dict[str, float | None]]:
    """{pipeline: {rps, error_rate, p99_ms}}; empty when Prometheus is unreachable."""
    stats: dict[str, dict[str, float | None]] = {}
    for name, promql in QUERIES.items():
        try:
            results = prometheus.query(settings, promql)
        except httpx.HTTPError:
            return {}
        for series in results:
            stats.setdefault(series["metric"].get("pipeline", "?"), {})[name] = prometheus.value(series)
    return stats
