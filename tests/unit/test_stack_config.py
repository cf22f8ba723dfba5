"""Rendered configuration: supervisord programs, Nginx routes, Prometheus targets."""

import configparser

import pytest

from flywheel import stack, topology
from flywheel.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings.load(
        {
            "FLYWHEEL_STATE_DIR": str(tmp_path / "state"),
            "FLYWHEEL_NGINX_PORT": "18000",
            "MINIO_ROOT_USER": "u",
            "MINIO_ROOT_PASSWORD": "p",
            "FLYWHEEL_WEBHOOK_TOKEN": "t",
            "AIRFLOW_ADMIN_PASSWORD": "a",
        }
    )


def test_every_service_is_a_supervised_program(settings):
    conf = configparser.RawConfigParser()
    conf.read_string(stack.supervisor_conf(settings))
    programs = {s.removeprefix("program:") for s in conf.sections() if s.startswith("program:")}
    assert programs == {svc.name for svc in topology.services(settings)}
    for name in programs:
        section = conf[f"program:{name}"]
        assert section["autorestart"] == "true"
        assert section["stopasgroup"] == "true"
        assert section["stdout_logfile"].startswith(str(settings.logs))


def test_minio_is_told_where_to_send_and_queue_events(settings):
    env = topology.minio_env(settings)
    assert env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_FLYWHEEL"] == f"http://127.0.0.1:{settings.ports.bridge}/minio/events"
    assert env["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_FLYWHEEL"] == "t"
    assert env["MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_FLYWHEEL"].startswith(str(settings.state))


def test_nginx_routes_default_and_per_pipeline(settings):
    conf = stack.nginx_conf(settings, ["iris", "wine"])
    assert "listen 127.0.0.1:18000;" in conf
    assert "location = /predict { proxy_pass http://flywheel_iris/predict; }" in conf
    assert "location = /wine/predict { proxy_pass http://flywheel_wine/predict; }" in conf
    assert "@" not in conf.replace("@unavailable", "")


def test_upstream_is_one_server_with_keepalive():
    assert stack.upstream_conf("iris", "127.0.0.1", 3101) == (
        "upstream flywheel_iris {\n    server 127.0.0.1:3101;\n    keepalive 64;\n}\n"
    )


def test_prometheus_scrapes_bentos_from_files_and_nginx(settings):
    import yaml

    conf = yaml.safe_load(stack.prometheus_conf(settings))
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    assert jobs["bento"]["file_sd_configs"][0]["files"] == [f"{settings.state}/prometheus/targets/*.json"]
    assert jobs["nginx"]["static_configs"][0]["targets"] == [f"127.0.0.1:{settings.ports.nginx_exporter}"]


def test_render_keeps_existing_deployments(settings):
    stack.render(settings)
    upstream = settings.state / "nginx" / "upstreams" / "iris.conf"
    upstream.write_text(stack.upstream_conf("iris", "127.0.0.1", 9999))
    stack.render(settings)
    assert "9999" in upstream.read_text()
