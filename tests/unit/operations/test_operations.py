"""The operator's tools, their pure parts: parameter checks, alert parsing, finding a request."""

import pytest

from flywheel.core import pipelines
from flywheel.core.settings import REPO_ROOT, Settings
from flywheel.operations import alerts, lineage


def test_parameters_are_checked_against_the_framework():
    assert pipelines.check_params("xgboost", {"max_depth": 4, "eta": 0.1}, "run") == {"max_depth": 4, "eta": 0.1}
    assert pipelines.check_params("tensorflow", {"epochs": 3.0}, "run") == {"epochs": 3}
    for bad, says in [
        ({"max_depht": 4}, "unknown xgboost parameter 'max_depht'"),
        ({"max_depth": 2.5}, "must be a whole number"),
        ({"max_depth": True}, "must be a whole number"),
        ({"eta": 7}, "between"),
        ({"tree_method": "gpu"}, "expected one of"),
    ]:
        with pytest.raises(pipelines.PipelineError, match=says):
            pipelines.check_params("xgboost", bad, "run")
    with pytest.raises(pipelines.PipelineError, match="mapping"):
        pipelines.check_params("xgboost", [1], "run")


def test_a_pipeline_file_with_a_misspelt_parameter_is_refused(tmp_path):
    text = (REPO_ROOT / "pipelines" / "iris.yaml").read_text().replace("max_depth:", "max_depht:")
    (tmp_path / "iris.yaml").write_text(text)
    with pytest.raises(pipelines.PipelineError, match="max_depht"):
        pipelines.load(tmp_path / "iris.yaml")


def test_alertmanager_payloads_become_flywheel_alerts():
    body = {
        "version": "4",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "FlywheelHighErrorRate", "pipeline": "iris", "model_version": "3"},
                "annotations": {"summary": "iris v3: more than 5% of /predict requests fail"},
                "startsAt": "2026-11-23T12:00:00Z",
            }
        ],
    }
    [a] = alerts.from_alertmanager(body)
    assert (a["source"], a["name"], a["status"]) == ("prometheus", "FlywheelHighErrorRate", "firing")
    assert a["labels"]["pipeline"] == "iris" and "5%" in a["summary"]


def test_alerts_are_recorded_privately_even_without_a_webhook(tmp_path):
    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path)})
    a = alerts.alert("airflow", "Flywheel: dataset rejected", "iris/x.csv: missing column(s)", {"pipeline": "iris"})
    assert alerts.notify(settings, [a]) is False  # nowhere to send it
    [path] = alerts.folder(settings).glob("*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert alerts.recent(settings)[0]["summary"] == a["summary"]
    assert alerts.firing(settings)[0]["name"] == "Flywheel: dataset rejected"


def test_a_request_is_found_in_nginx_access_log(tmp_path):
    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path)})
    settings.logs.mkdir(parents=True)
    (settings.logs / "nginx-access.log").write_text(
        '127.0.0.1 [2026-11-23T12:00:00+00:00] "POST /iris/predict HTTP/1.1" 200 150 rt=0.002 '
        "upstream=127.0.0.1:3100 request_id=abc-1 pipeline=iris model_version=7\n"
        '127.0.0.1 [2026-11-23T12:00:01+00:00] "POST /iris/predict HTTP/1.1" 503 80 rt=0.000 '
        "upstream=- request_id=abc-2 pipeline=iris model_version=-\n"
    )
    assert lineage.find_request(settings, "abc-1")["version"] == "7"
    with pytest.raises(lineage.LineageError, match="got no model"):
        lineage.find_request(settings, "abc-2")
    with pytest.raises(lineage.LineageError, match="no request"):
        lineage.find_request(settings, "abc-3")
