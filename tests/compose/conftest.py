"""The compose stack for tests/compose: up with `docker compose up --wait`, every log on failure, `down -v`.

Run by tests/compose/run.sh (`make test-compose`), which has found or started the engine, found or
built Compose v2, provided the base images and built ours; it hands over the Compose command and the
run's credentials through FLYWHEEL_COMPOSE and FLYWHEEL_COMPOSE_ENV_FILE, and the compose files
(docker-compose.yml and the test's tests/compose/test.yml) through FLYWHEEL_COMPOSE_FILES. Nothing here skips: without
them the tests fail and say how to run them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flywheel.core.settings import GENERATED_SECRETS, REPO_ROOT, Ports, Settings, read_env_file

PROJECT = "flywheel-test"
# Host ports: the defaults plus this, on 127.0.0.1 only, beside a developer's own stacks (embedded
# mode's defaults, and the embedded e2e test's +10000).
PORT_OFFSET = 20000
PUBLISHED = (
    *("nginx", "airflow", "mlflow", "minio", "minio_console", "prometheus", "alertmanager", "bridge", "inference"),
)
WEBHOOK_PORT = 28181  # tests/compose/test.yml's receiver of the stack's alerts
UP_TIMEOUT = 900  # seconds for `up --wait`: a cold 2-core machine, Airflow's 60 s health checks
FIGURES: dict[str, float | str] = {}


def figure(name: str, value: float | str) -> None:
    """A measurement for docs/measurements.md, printed at the end of the run."""
    FIGURES[name] = round(value, 1) if isinstance(value, float) else value


@dataclass
class Compose:
    command: list[str]
    env_file: Path
    files: list[str] = field(default_factory=lambda: ["-f", "docker-compose.yml"])
    profiles: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        ports = {f"FLYWHEEL_{name.upper()}_PORT": str(getattr(Ports(), name) + PORT_OFFSET) for name in PUBLISHED}
        return {**os.environ, **ports, "FLYWHEEL_WEBHOOK_TEST_PORT": str(WEBHOOK_PORT), **self.environment}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        profiles = [arg for p in self.profiles for arg in ("--profile", p)]
        command = [*self.command, "-p", PROJECT, "--env-file", str(self.env_file), *self.files, *profiles, *args]
        result = subprocess.run(command, cwd=REPO_ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    def exec(self, service: str, *command: str, check: bool = True) -> str:
        return self("exec", "-T", service, *command, check=check).stdout

    def container(self, service: str) -> dict:
        container_id = self("ps", "-q", service).stdout.split()[0]
        out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]

    def up(self) -> float:
        started = time.monotonic()
        self("up", "--detach", "--wait", "--wait-timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 120)
        return time.monotonic() - started

    def print_logs(self, lines: int = 60) -> None:
        """Every container's last lines (the one-shot inits and the exited too), then the programs
        supervisord runs in `serving` and the newest Airflow task logs, which live on the state volume."""
        services = self("ps", "--all", "--services", check=False).stdout.split()
        for service in services:
            out = self("logs", "--no-color", "--timestamps", "--tail", str(lines), service, check=False)
            print(f"\n===== container {service} (last {lines} lines) =====\n{out.stdout}{out.stderr}")
        script = (
            f'for f in /var/lib/flywheel/logs/*.log; do echo "===== serving: $f"; tail -n {lines} "$f"; done; '
            "for f in $(ls -t $(find /var/lib/flywheel/logs/airflow -name '*.log') | head -6); do "
            f'echo "===== airflow task log: $f"; tail -n {lines} "$f"; done'
        )
        out = self("exec", "-T", "serving", "sh", "-c", script, check=False)
        print(out.stdout[-60000:], out.stderr[-2000:])


def _compose() -> Compose:
    command, env_file = os.environ.get("FLYWHEEL_COMPOSE"), os.environ.get("FLYWHEEL_COMPOSE_ENV_FILE")
    if not command or not env_file:
        pytest.fail("tests/compose needs a Docker engine, images and credentials: run `make test-compose`")
    files = shlex.split(os.environ.get("FLYWHEEL_COMPOSE_FILES", "-f docker-compose.yml"))
    return Compose(shlex.split(command), Path(env_file), files)


@pytest.fixture(scope="session")
def compose(request):
    """The stack, up and healthy; `down -v` afterwards, after printing every log if a test failed."""
    stack = _compose()
    if seconds := os.environ.get("FLYWHEEL_COMPOSE_BUILD_SECONDS"):
        figure("image build (s)", float(seconds))
    stack("down", "--volumes", "--remove-orphans", check=False)  # what an interrupted run left
    failed_before = request.session.testsfailed
    try:
        figure("up --wait (s)", stack.up())
        yield stack
    except BaseException:
        stack.print_logs()
        raise
    else:
        if request.session.testsfailed > failed_before:
            stack.print_logs()
    finally:
        stack.profiles = ["celery"]  # whatever a test started, all of it goes
        stack("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)


@pytest.fixture(scope="session")
def settings(compose) -> Settings:
    """What the host sees: the published ports on 127.0.0.1 and this run's credentials."""
    values = read_env_file(compose.env_file)
    ports = Ports(**{name: getattr(Ports(), name) + PORT_OFFSET for name in PUBLISHED})
    state = Path(tempfile.mkdtemp(prefix="flywheel-compose-test-"))
    keys = tuple(k for k in values.get("FLYWHEEL_API_KEYS", "").split(",") if k)
    secrets = {n: values[n] for n in GENERATED_SECRETS}
    return Settings(repo=REPO_ROOT, state=state, ports=ports, secrets=secrets, api_keys=keys)


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("compose figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name:<40} {value}")
    out = REPO_ROOT / ".cache" / "compose" / "figures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=1) + "\n")
