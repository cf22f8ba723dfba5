"""Rendered configuration: supervisord programs, Nginx routes, Prometheus targets."""

import configparser
import re
import subprocess

import pytest

from flywheel.core.settings import Settings
from flywheel.platform import configs, routes, supervisor, topology


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
    conf.read_string(supervisor.render(supervisor.main_conf(settings, configs.programs(settings))))
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
    # ...and once more at once, without a queue: the bridge acts on the first it handles.
    assert env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_FLYWHEELFAST"] == env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_FLYWHEEL"]
    assert env["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_FLYWHEELFAST"] == "t"
    assert "MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_FLYWHEELFAST" not in env


def test_nginx_config_is_valid_for_the_real_nginx(settings):
    """The rendered front door, its routes and an upstream, checked by `nginx -t` itself."""
    configs.render(settings)
    conf = (settings.state / "nginx" / "nginx.conf").read_text()
    assert "listen 127.0.0.1:18000;" in conf
    assert "rewrite ^ /iris/predict last;" in (settings.state / "nginx" / "locations.conf").read_text()
    assert not re.findall(r"@[A-Z_]+@", conf), "a placeholder left unfilled"
    (settings.state / "nginx" / "upstreams" / "iris.conf").write_text(
        routes.upstream_conf("iris", "127.0.0.1", [3100, 3101])
    )
    nginx = topology.binary("nginx")
    checked = subprocess.run(
        [nginx, "-t", "-q", "-c", str(settings.state / "nginx" / "nginx.conf")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_every_error_nginx_can_answer_itself_is_json(settings):
    """Each status Nginx may produce on its own goes to a named location that returns JSON."""
    configs.render(settings)
    conf = (settings.state / "nginx" / "nginx.conf").read_text()
    pages = dict(re.findall(r"error_page ([\d ]+) = (\S+);", conf))
    covered = {int(code) for codes in pages for code in codes.split()}
    assert covered >= {400, 405, 413, 414, 500, 502, 503, 504}
    for target in pages.values():
        block = f"location {target} {{" if target.startswith("@") else f"location = {target} {{"
        body = conf.split(block)[1].split("}")[0]
        assert re.search(r"return \d{3} '\{\"error\": ", body), (target, body)


def test_prometheus_scrapes_bentos_from_files_and_nginx(settings):
    import yaml

    conf = yaml.safe_load(configs.prometheus_conf(settings))
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    assert jobs["bento"]["file_sd_configs"][0]["files"] == [f"{settings.state}/prometheus/targets/*.json"]
    assert jobs["nginx"]["static_configs"][0]["targets"] == [f"127.0.0.1:{settings.ports.nginx_exporter}"]


def test_render_keeps_existing_deployments(settings):
    configs.render(settings)
    record = settings.state / "deployments" / "iris.json"
    record.parent.mkdir()
    record.write_text(
        '{"pipeline": "iris", "version": "3", "bento_tag": "flywheel-iris:v3", "colour": "green",'
        ' "ports": [9998, 9999], "deployed_at": 0}'
    )
    configs.render(settings)
    assert "9999" in (settings.state / "nginx" / "upstreams" / "iris.conf").read_text()
    assert "proxy_pass http://flywheel_iris/predict;" in (settings.state / "nginx" / "locations.conf").read_text()
