"""End to end: the doors are locked. Loopback listeners, logins, private files, least privilege, API keys."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from minio.error import S3Error

from flywheel.clients import load as loadgen
from flywheel.clients.api import Client
from flywheel.clients.objectstore import client as minio_client
from flywheel.core.settings import MLFLOW_ADMIN_USER, MLFLOW_SERVICE_USER, Settings, write_private
from flywheel.platform import deployments, reaper, stack, supervisor
from tests.e2e.stack_ops import DEADLINE, TRAINING, csv_bytes, put, served, wait_until

pytestmark = pytest.mark.e2e


def _listening_inodes() -> dict[str, str]:
    """inode -> local address of every listening TCP socket (IPv4 and IPv6)."""
    found = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            if width == 8:
                ip = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "::1" if address == "0" * 24 + "01000000" else f"ipv6:{address}"
            found[fields[9]] = f"{ip}:{int(port, 16)}"
    return found


def test_every_listener_of_the_stack_is_on_loopback(stack_settings):
    inodes = _listening_inodes()
    supervisord = int((stack_settings.state / "supervisord.pid").read_text())
    url = f"unix://{stack_settings.state / 'supervisor.sock'}"
    listeners = []
    for proc in reaper.snapshot().values():
        if proc.sid != supervisord and proc.server_url != url and proc.pid != supervisord:
            continue
        try:
            links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if inode in inodes:
                command = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                listeners.append((inodes[inode], command))
    print(f"\n{len(set(listeners))} listening sockets: {sorted({a for a, _ in listeners})}")
    ports = {int(a.rsplit(":", 1)[1]) for a, _ in listeners}
    fixed = {v for k, v in dataclasses.asdict(stack_settings.ports).items() if k != "bento_base"}
    assert fixed <= ports, f"not seen listening: {sorted(fixed - ports)}"  # the whole stack was seen
    exposed = sorted({(a, c) for a, c in listeners if not a.startswith(("127.0.0.1:", "::1:"))})
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_mlflow_changes_nothing_without_a_login(stack_settings):
    base = f"{stack_settings.mlflow_url}/api/2.0/mlflow"
    anonymous = httpx.post(f"{base}/experiments/create", json={"name": "intruder"})
    assert anonymous.status_code == 401
    alias = {"name": "iris", "alias": "production", "version": "1"}
    assert httpx.post(f"{base}/registered-models/alias", json=alias).status_code == 401
    wrong = httpx.post(f"{base}/registered-models/alias", json=alias, auth=(MLFLOW_SERVICE_USER, "wrong"))
    assert wrong.status_code == 401
    for user, password in (
        (MLFLOW_SERVICE_USER, stack_settings.secrets["MLFLOW_TRACKING_PASSWORD"]),
        (MLFLOW_ADMIN_USER, stack_settings.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]),
    ):
        r = httpx.post(f"{base}/experiments/search", json={"max_results": 1}, auth=(user, password))
        assert r.status_code == 200, (user, r.text)


def test_prometheus_cannot_be_reloaded_or_stopped_over_http(stack_settings):
    for path in ("/-/reload", "/-/quit"):
        r = httpx.post(f"{stack_settings.prometheus_url}{path}")
        assert r.status_code >= 400, path
    assert httpx.get(f"{stack_settings.prometheus_url}/-/ready").status_code == 200


def test_the_state_folder_is_private_and_secrets_are_in_private_files(stack_settings):
    assert stat.S_IMODE(stack_settings.state.stat().st_mode) == 0o700
    for path in [
        Path(os.environ["FLYWHEEL_ENV_FILE"]),  # the stack's .env
        stack_settings.state / "supervisord.conf",
        stack_settings.state / "nginx" / "api_keys.conf",
        stack_settings.airflow_home / "passwords.json",
        stack_settings.state / "alertmanager" / "alertmanager.yml",  # the bridge's token
        *(stack_settings.state / "supervisor" / "conf.d").glob("*.conf"),
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_no_secret_in_a_command_line_or_a_log(stack_settings):
    secrets = [v for v in stack_settings.secrets.values() if len(v) >= 12]
    for proc in reaper.snapshot().values():
        try:
            command = Path(f"/proc/{proc.pid}/cmdline").read_text(errors="replace")
        except OSError:
            continue
        assert not [s for s in secrets if s in command], f"a secret in the command line of {proc.pid}"
    for log in stack_settings.logs.rglob("*.log"):
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"a secret in {log}"


def test_a_bento_server_gets_no_secret(stack_settings):
    if served(stack_settings) is None:
        put(stack_settings, "iris/security-baseline.csv", csv_bytes(TRAINING))
        wait_until(lambda: served(stack_settings), DEADLINE, "iris served")
    secrets = [v for v in stack_settings.secrets.values() if len(v) >= 12]
    names = {"MINIO_ROOT_PASSWORD", "FLYWHEEL_ML_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"}
    bentos = 0
    for proc in reaper.snapshot().values():
        try:
            command = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            if b"bentoml" not in command and b"serving/replica.py" not in command:  # a worker, or its launcher
                continue
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        bentos += 1
        assert not [s for s in secrets if any(s in entry for entry in environ)], f"a secret in bento {proc.pid}"
        assert not names & {entry.split("=", 1)[0] for entry in environ}, proc.pid
    assert bentos >= 2, "no Bento server seen"  # iris' two replicas at least


def test_the_platform_identity_reads_datasets_and_writes_only_mlflow(stack_settings):
    ml = minio_client(stack_settings)
    body = b"x,y\n1,2\n"
    with pytest.raises(S3Error, match="AccessDenied"):
        ml.put_object("datasets", "iris/by-the-platform.csv", io.BytesIO(body), len(body))
    with pytest.raises(S3Error, match="AccessDenied"):
        ml.make_bucket("intruder")
    ml.put_object("mlflow", "security-check/probe", io.BytesIO(body), len(body))
    ml.remove_object("mlflow", "security-check/probe")
    assert isinstance(list(ml.list_objects("datasets", prefix="iris/")), list)
    anonymous = httpx.get(f"{stack_settings.url(stack_settings.ports.minio)}/datasets/")
    assert anonymous.status_code == 403


def set_api_keys(keys: str) -> None:
    """FLYWHEEL_API_KEYS in the stack's env file, then `flywheel up`: as an operator turns keys on, rotates
    them, or turns them off."""
    env_file = Path(os.environ["FLYWHEEL_ENV_FILE"])
    lines = [line for line in env_file.read_text().splitlines() if not line.startswith("FLYWHEEL_API_KEYS=")]
    write_private(env_file, "\n".join([*lines, f"FLYWHEEL_API_KEYS={keys}"]) + "\n")
    stack.up(Settings.load(), progress=lambda _: None, timeout=300)


def bento_pids(settings, pipeline: str = "iris") -> dict[str, int]:
    """The pids of the replicas that serve the pipeline (not an old colour a rollout is still stopping)."""
    serving = {name.split(":")[-1] for name in deployments.current(settings, pipeline).programs}
    return {p["name"]: p["pid"] for p in supervisor.rpc(settings).getAllProcessInfo() if p["name"] in serving}


def test_api_keys_from_up_guard_predict_and_deploys_and_rotate_without_a_lost_request(stack_settings):
    """Keys on from `flywheel up`: a request without one gets a JSON 401, an upload is still trained and
    rolled out (the deploy step proves it through Nginx with a key), the CLI sends one, and rotating them
    under load restarts no Bento and loses no request."""
    key_a, key_b = "e2e-key-a-0123456789abcdef", "e2e-key-b-0123456789abcdef"
    url = f"{stack_settings.predict_url}/iris/predict"
    body = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    before = served(stack_settings)
    try:
        set_api_keys(key_a)
        denied = httpx.post(url, json=body)
        assert denied.status_code == 401 and "API key" in denied.json()["error"]
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope-0123456789abcdef"}).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"}).status_code == 200

        upload = put(stack_settings, "iris/with-api-keys.csv", csv_bytes(TRAINING[11:] + TRAINING[:11]))
        with Client(stack_settings, api_key=key_a) as client:
            client.wait_for_version("iris", body["inputs"][0], before["model"]["version"], timeout=DEADLINE)
            assert client.served("iris", body["inputs"][0])["dataset"]["version_id"] == upload["version_id"]
        cli = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "predict", json.dumps(body["inputs"]), "--pipeline", "iris"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0 and '"predictions"' in cli.stdout, cli.stdout + cli.stderr

        pids = bento_pids(stack_settings)
        load = loadgen.start(url, body, connections=4, seconds=25, api_key=key_a)
        time.sleep(3)
        set_api_keys(f"{key_a},{key_b}")  # rotation: the new key joins while clients still send the old one
        stats = loadgen.finish(load)
        assert stats["requests"] > 500 and stats["failed"] == 0, stats
        set_api_keys(key_b)  # the old one goes
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"}).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key_b}"}).status_code == 200
        assert bento_pids(stack_settings) == pids, "no Bento was restarted"
    finally:
        set_api_keys("")
    assert httpx.post(url, json=body).status_code == 200
