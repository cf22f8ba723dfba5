"""The runner: where a step runs changes nothing about the DAGs or about how its result comes back."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flywheel.core.settings import REPO_ROOT, Settings
from flywheel.core.steps import FAILED, OK, REJECTED, StepSpec
from flywheel.core.waiting import wait_until
from flywheel.orchestration import runner
from flywheel.platform import reaper, topology

STEP = """
import sys, time
from flywheel.core import steps
from flywheel.core.errors import DatasetInvalid

def fake(outcome: str, rows: int = 0) -> dict:
    print("working on it", flush=True)
    if outcome == "environment":
        import os
        from flywheel.core.settings import Settings
        return {"env": sorted(os.environ), "secrets": {k: v for k, v in Settings.load().secrets.items() if v}}
    if outcome == "reject":
        raise DatasetInvalid("x.csv: 3 rows, need at least 20 (rule: minimum rows)")
    if outcome == "crash":
        raise ConnectionError("MLflow went away")
    if outcome == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome == "linger":  # a step that started a process of its own, and waits
        import os, subprocess
        child = subprocess.Popen(["sleep", "300"])
        print(f"pids {os.getpid()} {child.pid}", flush=True)
        time.sleep(300)
    return {"rows": rows}

if __name__ == "__main__":
    sys.exit(steps.main(fake))
"""


def start_step_server(settings: Settings) -> subprocess.Popen:
    """The warm step server as supervisord starts it, with a secret of its own no step may see."""
    server = subprocess.Popen(
        [*topology_command(settings), "--preload", "json"],
        env={**os.environ, "SERVER_ONLY_SECRET": "not-for-steps"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert "listening" in server.stdout.readline()
    return server


def topology_command(settings: Settings) -> list[str]:
    return next(svc.command for svc in topology.services(settings) if svc.name == "step-server")


@pytest.fixture(params=["cold", "warm"])
def settings(request, tmp_path, monkeypatch):
    """A stack whose ML venv's python is this one, with a fake step module on its path; its steps run
    cold (no step server) or warm (its step server running)."""
    bin_dir = tmp_path / "repo" / ".venv" / "ml" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "fake_step.py").write_text(textwrap.dedent(STEP))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
    settings = Settings.load(
        {"FLYWHEEL_REPO": str(tmp_path / "repo"), "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"}
    )
    if request.param == "cold":
        yield settings
        return
    server = start_step_server(settings)
    yield settings
    server.kill()
    server.wait()


def test_a_step_command_names_its_arguments_and_result_file():
    spec = StepSpec("flywheel.training.train", {"pipeline": "iris", "upload": {"key": "iris/a b.csv"}})
    command = spec.command("/tmp/r.json", "/venv/ml/bin/python")
    assert command[:3] == ["/venv/ml/bin/python", "-m", "flywheel.training.train"]
    assert command[3:] == [
        "--args",
        '{"pipeline": "iris", "upload": {"key": "iris/a b.csv"}}',
        "--result",
        "/tmp/r.json",
    ]


def test_the_local_runner_reads_the_result_file_not_the_output(settings, capsys):
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "ok", "rows": 150}), "local")
    assert (result.status, result.payload) == (OK, {"rows": 150})
    assert "working on it" in capsys.readouterr().out  # the step's output went to the task log


def test_a_rejection_is_a_result_with_its_reason(settings):
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "reject"}), "local")
    assert result.status == REJECTED
    assert result.reason == "x.csv: 3 rows, need at least 20 (rule: minimum rows)"


def test_an_error_is_a_failure_a_retry_may_fix(settings):
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "crash"}), "local")
    assert result.status == FAILED and "ConnectionError: MLflow went away" in result.reason


def test_a_step_killed_before_writing_its_result_has_failed(settings):
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "die"}), "local")
    assert result.status == FAILED
    assert "without writing its result" in result.reason and "working on it" in result.reason
    assert ("exited -9" in result.reason) != ("was killed" in result.reason)  # cold: its exit status; warm: no answer


def test_a_step_gets_the_ml_identity_and_nothing_of_airflows_secrets(settings, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "airflows-own-secret")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:p@db/airflow")
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "environment"}), "local")
    assert not [k for k in result.payload["env"] if k.startswith("AIRFLOW")]
    assert "MLFLOW_TRACKING_URI" in result.payload["env"] and "AWS_SECRET_ACCESS_KEY" in result.payload["env"]
    assert set(result.payload["secrets"]) <= {"FLYWHEEL_ML_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD"}, "no .env read"
    assert "SERVER_ONLY_SECRET" not in result.payload["env"]  # warm: nothing of the step server's environment


def test_warm_steps_are_processes_of_their_own_forked_by_the_step_server(settings, capsys):
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "ok", "rows": 1}), "local")
    out = capsys.readouterr().out
    assert result.ok and ("runs warm" in out) == settings.step_socket.exists(), out
    if "runs warm" in out:  # its pid is none of this test's, nor the server's
        pid = int(out.split("runs warm: process ")[1].split(",")[0])
        assert pid != os.getpid() and not os.path.exists(f"/proc/{pid}")  # and it is gone


def test_result_folders_that_killed_tasks_left_go_after_a_day(settings):
    left = settings.state / "steps" / "flywheel-step-killed"
    left.mkdir(parents=True)
    os.utime(left, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    fresh = settings.state / "steps" / "flywheel-step-running"
    fresh.mkdir()
    assert runner.run(settings, StepSpec("fake_step", {"outcome": "ok"}), "local").ok
    warm = settings.step_socket.exists()
    assert (left.exists(), fresh.exists()) == (not warm, True)  # only warm steps put results there


def alive(pid: int) -> bool:
    return (proc := reaper._read(pid)) is not None and not proc.zombie


def test_a_killed_task_takes_its_step_and_what_the_step_started_with_it(settings):
    """kill -9 of the task (the runner's process): its step, cold or warm, and the step's own child go."""
    code = (
        "import sys; from flywheel.core.settings import Settings; from flywheel.core.steps import StepSpec;"
        "from flywheel.orchestration import runner;"
        f"runner.run(Settings.load({{'FLYWHEEL_REPO': {str(settings.repo)!r}}}),"
        " StepSpec('fake_step', {'outcome': 'linger'}), 'local')"
    )
    task = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = next(line for line in task.stdout if line.startswith("pids "))
        pids = [int(p) for p in line.split()[1:]]
        assert all(alive(p) for p in pids)
    finally:
        task.kill()
        task.wait()
    if not settings.step_socket.exists():
        os.killpg(task.pid, signal.SIGKILL)  # cold: what Airflow does to a task's process group
    wait_until(lambda: not any(alive(p) for p in pids), 10, f"steps {pids} gone with their task")


def test_a_step_server_gone_means_steps_run_cold(settings, capsys):
    if settings.step_socket.exists():
        server_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and str(settings.step_socket).encode() in _cmdline(p)
        )
        os.kill(server_pid, signal.SIGKILL)
        wait_until(lambda: not alive(server_pid), 10, "the step server gone")
    result = runner.run(settings, StepSpec("fake_step", {"outcome": "ok", "rows": 2}), "local")
    assert (result.status, result.payload) == (OK, {"rows": 2})
    assert "runs warm" not in capsys.readouterr().out


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_containers_get_the_services_but_no_path_of_this_machine(settings):
    env = runner.container_env(settings)
    assert env["MLFLOW_TRACKING_URI"] == settings.mlflow_url
    assert env["AWS_ACCESS_KEY_ID"] == "flywheel-ml"
    # The state folder is a volume there too; the repo and the venvs are the image's own.
    paths = {k: v for k, v in env.items() if v.startswith("/")}
    assert paths and all(v.startswith(str(settings.state)) for v in paths.values()), paths
    assert "MINIO_ROOT_PASSWORD" not in env


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_RUNNER", "ssh")
    with pytest.raises(ValueError, match="local, docker, kubernetes"):
        runner.backend()


def _graph(backend: str) -> str:
    code = (
        "import sys; sys.path.insert(0, 'dags'); import flywheel_pipelines as m;"
        "print(sorted(f'{d.dag_id}.{t.task_id}:{type(t).__name__}:{sorted(t.downstream_task_ids)}'"
        " for d in (m.train_iris, m.deploy_iris) for t in d.tasks))"
    )
    env = {**os.environ, "FLYWHEEL_RUNNER": backend}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, env=env
    ).stdout


def test_every_runner_gets_the_same_dags():
    """The runner decides where a step runs, never which tasks exist."""
    local = _graph("local")
    assert "train_iris.validate:_PythonDecoratedOperator:['train']" in local
    assert _graph("docker") == local
    assert _graph("kubernetes") == local
