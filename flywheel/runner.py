"""Runner: run a flywheel step in the ML environment, outside Airflow's, and read its result.

One step spec, three backends: a local subprocess in the ML venv (embedded mode, the one these
DAGs use), a DockerOperator with the trainer image (compose mode) and a KubernetesPodOperator
(scale-out). The last two are described by `operator_kwargs`; they need their providers installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass

from flywheel.settings import Settings

BACKENDS = ("local", "docker", "kubernetes")
TRAINER_IMAGE = "flywheel/trainer:latest"  # built from services/trainer/Dockerfile


RESULT_FILE_ENV = "FLYWHEEL_RESULT_FILE"
KUBERNETES_XCOM = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads XCom


def emit(result: dict) -> None:
    """A step's result: one JSON line, last on stdout (local runner, DockerOperator's XCom), and
    the file FLYWHEEL_RESULT_FILE names, if any (KubernetesPodOperator's XCom)."""
    line = json.dumps(result)
    print(line, flush=True)
    if path := os.environ.get(RESULT_FILE_ENV):
        with open(path, "w") as f:
            f.write(line)


class StepFailed(RuntimeError):
    """The step exited non-zero; the message carries its own reason."""


class DatasetRejected(StepFailed):
    """The step refused the dataset (exit code 2): retrying cannot help."""


@dataclass(frozen=True)
class StepSpec:
    """`python -m flywheel.<module> ARGS`: what runs, whatever runs it."""

    module: str
    args: tuple[str, ...] = ()

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", f"flywheel.{self.module}", *self.args]


def step(module: str, *args: str) -> StepSpec:
    return StepSpec(module, tuple(args))


def run_local(settings: Settings, spec: StepSpec) -> dict:
    """Run in the ML venv; output streams into the task log; the last JSON line is the result."""
    command = spec.command(str(settings.venv_ml / "bin" / "python"))
    env = {**os.environ, **settings.client_env(), "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
    if proc.returncode == 2:
        reason = next((line for line in reversed(tail) if line.startswith("INVALID DATASET")), tail[-1] if tail else "")
        raise DatasetRejected(reason)
    if proc.returncode != 0:
        raise StepFailed(f"flywheel.{spec.module} exited {proc.returncode}: " + " | ".join(list(tail)[-5:]))
    for line in reversed(tail):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed(f"flywheel.{spec.module} printed no JSON result")


def run_step(settings: Settings, module: str, *args: str) -> dict:
    return run_local(settings, step(module, *args))


def operator_kwargs(backend: str, spec: StepSpec, settings: Settings, task_id: str, image: str = TRAINER_IMAGE) -> dict:
    """Arguments for DockerOperator or KubernetesPodOperator running the same step in the trainer image.

    Both push the step's last stdout line (its JSON result) to XCom, as the local runner returns it.
    """
    env = {
        k: v
        for k, v in settings.client_env().items()
        if not k.startswith("FLYWHEEL_") or k == "FLYWHEEL_STATE_DIR" or k.endswith("_HOST")
    }
    if backend == "docker":
        return {
            "task_id": task_id,
            "image": image,
            "command": spec.command(),
            "environment": env,
            "network_mode": "flywheel",
            "auto_remove": "success",
            "do_xcom_push": True,
            "xcom_all": False,
            "mount_tmp_dir": False,
        }
    if backend == "kubernetes":
        # No shell between Airflow's templating and the step: arguments stay exactly as rendered.
        command = spec.command()
        return {
            "task_id": task_id,
            "name": task_id.replace("_", "-"),
            "image": image,
            "cmds": command[:3],
            "arguments": command[3:],
            "env_vars": {**env, RESULT_FILE_ENV: KUBERNETES_XCOM},
            "do_xcom_push": True,
            "get_logs": True,
            "on_finish_action": "delete_succeeded_pod",
        }
    raise ValueError(f"unknown runner backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def backend() -> str:
    """The configured backend: FLYWHEEL_RUNNER, `local` unless compose or Kubernetes set it."""
    name = os.environ.get("FLYWHEEL_RUNNER", "local")
    if name not in BACKENDS:
        raise ValueError(f"FLYWHEEL_RUNNER is {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def operator(backend_name: str, spec: StepSpec, settings: Settings, task_id: str, image: str = TRAINER_IMAGE):
    """The Airflow operator that runs `spec` in the trainer image (docker or kubernetes backend).

    Its arguments may hold Jinja (`{{ ti.xcom_pull(...) }}`): both operators template them.
    """
    kwargs = operator_kwargs(backend_name, spec, settings, task_id, image)
    if backend_name == "docker":
        from airflow.providers.docker.operators.docker import DockerOperator

        return DockerOperator(**kwargs)
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(**kwargs)


def result(value) -> dict:
    """A step's result as the next task receives it: a dict (local) or its JSON line (operators)."""
    return json.loads(value) if isinstance(value, str) else value
