"""The runner: one step spec, three backends."""

import sys

import pytest

from flywheel import runner
from flywheel.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path), "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"})


SPEC = runner.step("train", "--pipeline", "iris", "--dataset", '{"key": "iris/a b.csv"}')


def test_local_command_runs_in_the_given_interpreter():
    assert SPEC.command("/venv/ml/bin/python")[:3] == ["/venv/ml/bin/python", "-m", "flywheel.train"]


def test_docker_backend_runs_the_same_command_in_the_trainer_image(settings):
    kwargs = runner.operator_kwargs("docker", SPEC, settings, "train")
    assert kwargs["image"] == runner.TRAINER_IMAGE
    assert kwargs["command"] == SPEC.command()
    assert kwargs["environment"]["MLFLOW_TRACKING_URI"] == settings.mlflow_url
    assert kwargs["do_xcom_push"] and not kwargs["xcom_all"]


def test_kubernetes_backend_passes_arguments_unquoted_and_writes_xcom(settings):
    kwargs = runner.operator_kwargs("kubernetes", SPEC, settings, "train_iris")
    assert kwargs["cmds"] + kwargs["arguments"] == SPEC.command()  # no shell: Jinja renders them as given
    assert kwargs["env_vars"][runner.RESULT_FILE_ENV] == "/airflow/xcom/return.json"
    assert kwargs["name"] == "train-iris"


def test_emit_prints_the_result_and_writes_the_result_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runner.RESULT_FILE_ENV, str(tmp_path / "return.json"))
    runner.emit({"version": "3"})
    assert capsys.readouterr().out == '{"version": "3"}\n'
    assert (tmp_path / "return.json").read_text() == '{"version": "3"}'


@pytest.mark.parametrize("backend", ["docker", "kubernetes"])
def test_dags_wire_the_configured_backend(backend, monkeypatch):
    """The same DAG file, with FLYWHEEL_RUNNER set, runs the ML steps as operators of that backend."""
    import subprocess

    from flywheel.settings import REPO_ROOT

    code = (
        "import sys; sys.path.insert(0, 'dags'); import flywheel_pipelines as m;"
        "print(sorted(t.task_id + ':' + type(t).__name__ for t in m.train_iris.tasks + m.deploy_iris.tasks))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "FLYWHEEL_RUNNER": backend},
    ).stdout
    operator = {"docker": "DockerOperator", "kubernetes": "KubernetesPodOperator"}[backend]
    for step in ("validate", "train", "build"):
        assert f"'{step}:{operator}'" in out


def test_unknown_backend_is_refused(settings):
    with pytest.raises(ValueError, match="local, docker, kubernetes"):
        runner.operator_kwargs("ssh", SPEC, settings, "train")


def _fake_ml_venv(tmp_path, script: str) -> Settings:
    """A venv whose python runs `script` as the module, to exercise the local runner's protocol."""
    bin_dir = tmp_path / "repo" / ".venv" / "ml" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{script}'\n")
    (bin_dir / "python").chmod(0o755)
    return Settings.load({"FLYWHEEL_REPO": str(tmp_path / "repo"), "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"})


def test_local_runner_returns_the_last_json_line(tmp_path):
    settings = _fake_ml_venv(tmp_path, 'print("training..."); print("{\\"version\\": \\"3\\"}")')
    assert runner.run_step(settings, "train") == {"version": "3"}


def test_exit_code_2_is_a_rejected_dataset_with_its_reason(tmp_path):
    settings = _fake_ml_venv(tmp_path, 'import sys; print("INVALID DATASET x.csv: bad (rule: r)"); sys.exit(2)')
    with pytest.raises(runner.DatasetRejected, match="rule: r"):
        runner.run_step(settings, "validate")


def test_a_crash_is_a_step_failure(tmp_path):
    settings = _fake_ml_venv(tmp_path, 'raise SystemExit("boom")')
    with pytest.raises(runner.StepFailed, match="boom"):
        runner.run_step(settings, "train")
