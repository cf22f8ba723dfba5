"""Routes: stable port blocks, Nginx routes and upstreams, scrape targets, rewritten live."""

import json
import subprocess

import pytest

from flywheel.core import pipelines
from flywheel.core.settings import REPO_ROOT, Settings
from flywheel.platform import configs, deployments, routes, topology
from flywheel.platform.deployments import Deployment, Traffic

IRIS = (REPO_ROOT / "pipelines" / "iris.yaml").read_text()


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "pipelines").mkdir()
    return Settings.load(
        {"FLYWHEEL_STATE_DIR": str(tmp_path / "state"), "FLYWHEEL_PIPELINES_DIR": str(tmp_path / "pipelines")}
    )


def add(settings, name: str) -> None:
    (settings.pipelines_dir / f"{name}.yaml").write_text(IRIS.replace("name: iris", f"name: {name}"))


def deploy_record(settings, name: str, ports: list[int], version: str = "1") -> None:
    folder = settings.state / "deployments"
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "pipeline": name,
        "version": version,
        "bento_tag": f"flywheel-{name}:v{version}",
        "colour": "blue",
        "ports": ports,
        "deployed_at": 0,
    }
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_a_pipeline_keeps_its_ports_when_one_that_sorts_first_is_added(settings):
    add(settings, "iris")
    iris = routes.replica_ports(settings, "iris", "blue", 2)
    add(settings, "apple")
    routes.sync(settings, reload=False)
    apple = routes.replica_ports(settings, "apple", "blue", 2)
    assert routes.replica_ports(settings, "iris", "blue", 2) == iris
    assert not set(apple) & set(range(iris[0], iris[0] + routes.BLOCK))


def test_colours_and_replicas_of_one_pipeline_never_share_a_port(settings):
    base = routes.block(settings, "iris")
    ports = [routes.port(base, c, i) for c in routes.COLOURS for i in range(pipelines.MAX_REPLICAS)]
    assert len(set(ports)) == len(ports) == routes.BLOCK


def test_a_removed_pipeline_keeps_its_route_while_it_serves_and_loses_everything_after(settings):
    add(settings, "iris")
    add(settings, "wine")
    deploy_record(settings, "wine", routes.replica_ports(settings, "wine", "blue", 2))
    routes.sync(settings, reload=False)
    (settings.pipelines_dir / "wine.yaml").unlink()
    routes.sync(settings, reload=False)
    conf = (settings.state / "nginx" / "locations.conf").read_text()
    assert "proxy_pass http://flywheel_wine/predict;" in conf
    assert "no model of iris is serving yet" in conf
    (settings.state / "deployments" / "wine.json").unlink()  # retired
    assert routes.sync(settings, reload=False)
    assert "wine" not in (settings.state / "nginx" / "locations.conf").read_text()
    assert "wine" not in (settings.state / "nginx" / "routes.conf").read_text()
    assert not (settings.state / "nginx" / "upstreams" / "wine.conf").exists()
    assert not (settings.state / "prometheus" / "targets" / "wine.json").exists()
    assert "wine" not in routes.assigned(settings)
    assert not routes.sync(settings, reload=False), "nothing changed, nothing rewritten"


def test_upstream_balances_replicas_and_targets_label_each(settings):
    add(settings, "iris")
    deploy_record(settings, "iris", [3100, 3101], version="7")
    routes.sync(settings, reload=False)
    upstream = (settings.state / "nginx" / "upstreams" / "iris.conf").read_text()
    assert "least_conn;" in upstream and "127.0.0.1:3100 " in upstream and "127.0.0.1:3101 " in upstream
    targets = json.loads((settings.state / "prometheus" / "targets" / "iris.json").read_text())
    assert [t["labels"]["replica"] for t in targets] == ["0", "1"]
    assert {t["labels"]["model_version"] for t in targets} == {"7"}


def test_the_body_limit_admits_the_largest_legal_request_of_every_pipeline():
    iris = pipelines.load(REPO_ROOT / "pipelines" / "iris.yaml")
    rows = [{name: -1.2345678901234567e-308 for name in iris.features}] * 1000  # the Bentos' limit
    body = json.dumps({"inputs": rows})
    assert len(body) <= iris.plugin.largest_request(iris) <= routes.body_limit(iris)
    assert routes.body_buffer(routes.body_limit(iris)) == routes.body_limit(iris), "a table request stays in memory"
    digits = pipelines.load(REPO_ROOT / "pipelines" / "digits.yaml")
    h, w = digits.image_shape
    images = [[[-1.2345678901234567e-308] * w] * h] * 256
    assert len(json.dumps({"inputs": images})) <= digits.plugin.largest_request(digits) <= routes.body_limit(digits)


def test_each_pipeline_has_its_own_body_limit_and_bounded_buffer(settings):
    add(settings, "iris")
    (settings.pipelines_dir / "mnist.yaml").write_text((REPO_ROOT / "pipelines" / "mnist.yaml").read_text())
    routes.sync(settings, reload=False)
    conf = (settings.state / "nginx" / "locations.conf").read_text()
    limits = {
        block.split("/")[1]: int(block.split("client_max_body_size ")[1].split(";")[0])
        for block in conf.split("location = ")[1:]
        if block.split(" ")[0].endswith("/predict")
    }
    assert limits["iris"] < 1 << 20 < limits["mnist"], limits  # a 4-feature route does not take megabytes
    buffers = [int(b.split(";")[0]) for b in conf.split("client_body_buffer_size ")[1:]]
    assert max(buffers) <= 256 << 10


@pytest.mark.parametrize(
    "traffic",
    [
        Traffic("split", 10),
        Traffic("split", 100),
        Traffic("sticky", 50, key="X-User-Id"),
        Traffic("mirror", 0, sample=0.5),
        Traffic("mirror", 0, sample=1.0),
    ],
    ids=["canary-10", "canary-100", "ab", "shadow-half", "shadow-all"],
)
def test_a_candidate_gets_its_share_and_nginx_takes_the_config(settings, traffic):
    add(settings, "iris")
    deploy_record(settings, "iris", [3100, 3101], version="7")
    deployments.record_candidate(settings, "iris", Deployment("iris", "8", "b:v8", "green", (3108, 3109), 0), traffic)
    configs.render(settings)
    routes.sync(settings, reload=False)
    nginx = settings.state / "nginx"
    upstreams = (nginx / "upstreams" / "iris.conf").read_text()
    assert "upstream flywheel_iris {" in upstreams and "upstream flywheel_iris__candidate {" in upstreams
    assert "127.0.0.1:3108 " in upstreams.split("flywheel_iris__candidate")[1]
    locations = (nginx / "locations.conf").read_text()
    if traffic.mode == "mirror":
        assert "mirror /.shadow/iris;" in locations and "X-Flywheel-Role shadow" in locations
    else:
        assert "proxy_pass http://$flywheel_upstream_iris/predict;" in locations
        assert "X-Flywheel-Role $flywheel_arm_iris" in locations
    targets = json.loads((settings.state / "prometheus" / "targets" / "iris.json").read_text())
    assert {(t["labels"]["role"], t["labels"]["model_version"]) for t in targets} == {
        ("production", "7"),
        ("candidate", "8"),
    }
    checked = subprocess.run(
        [topology.binary("nginx"), "-t", "-q", "-c", str(nginx / "nginx.conf")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    deployments.record_candidate(settings, "iris", None)
    routes.sync(settings, reload=False)
    assert "__candidate" not in (nginx / "upstreams" / "iris.conf").read_text()
    assert "$flywheel_arm_iris" not in (nginx / "routes.conf").read_text()
