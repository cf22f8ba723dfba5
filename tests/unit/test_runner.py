"""The runner: one step spec, three backends."""

import shlex
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


def test_kubernetes_backend_quotes_the_json_argument(settings):
    kwargs = runner.operator_kwargs("kubernetes", SPEC, settings, "train_iris")
    script = kwargs["arguments"][0]
    assert shlex.split(script)[: len(SPEC.command())] == SPEC.command()
    assert script.endswith("> /airflow/xcom/return.json")
    assert kwargs["name"] == "train-iris"


def test_unknown_backend_is_refused(settings):
    with pytest.raises(ValueError, match="local, docker, kubernetes"):
        runner.operator_kwargs("ssh", SPEC, settings, "train")


def _fake_ml_venv(tmp_path, script: str) -> Settings:
    """A venv whose python runs `script` as the module, to exercise the local runner's protocol."""
    bin_dir = tmp_path / "repo" / ".venv" / "ml" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{script}'\n")
    (bin_dir / "python").chmod(0o755)
    return Settings.load({"FLYWHEEL_REPO": str(tmp_path / "repo"), "MINIO_ROOT_USER": "u",
                          "MINIO_ROOT_PASSWORD": "p"})


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
