"""Runner: run a flywheel step in the ML environment, outside Airflow's, and read its result.

One step spec, three backends: a local subprocess in the ML venv (embedded mode, the one these
DAGs use), a DockerOperator with the trainer image (compose mode) and a KubernetesPodOperator
(scale-out). The last two are described by `operator_kwargs`; they need their providers installed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import deque
from dataclasses import dataclass

from flywheel.settings import Settings

BACKENDS = ("local", "docker", "kubernetes")
TRAINER_IMAGE = "flywheel/trainer:latest"  # built from services/trainer/Dockerfile


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
        reason = next((l for l in reversed(tail) if l.startswith("INVALID DATASET")), tail[-1] if tail else "")
        raise DatasetRejected(reason)
    if proc.returncode != 0:
        raise StepFailed(f"flywheel.{spec.module} exited {proc.returncode}: " + " | ".join(list(tail)[-5:]))
    for line in reversed(tail):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed(f"flywheel.{spec.module} printed no JSON result")


def run_step(settings: Settings, module: str, *args: str) -> dict:
    return run_local(settings, step(module, *args))


def operator_kwargs(backend: str, spec: StepSpec, settings: Settings, task_id: str,
                    image: str = TRAINER_IMAGE) -> dict:
    """Arguments for DockerOperator or KubernetesPodOperator running the same step in the trainer image.

    Both push the step's last stdout line (its JSON result) to XCom, as the local runner returns it.
    """
    env = {k: v for k, v in settings.client_env().items()
           if not k.startswith("FLYWHEEL_") or k == "FLYWHEEL_STATE_DIR" or k.endswith("_HOST")}
    if backend == "docker":
        return {"task_id": task_id, "image": image, "command": spec.command(), "environment": env,
                "network_mode": "flywheel", "auto_remove": "success", "do_xcom_push": True, "xcom_all": False,
                "mount_tmp_dir": False}
    if backend == "kubernetes":
        # The pod writes its result where the xcom sidecar reads it.
        script = shlex.join(spec.command()) + " | tee /dev/stderr | tail -n 1 > /airflow/xcom/return.json"
        return {"task_id": task_id, "name": task_id.replace("_", "-"), "image": image,
                "cmds": ["sh", "-c"], "arguments": [script], "env_vars": env, "do_xcom_push": True,
                "get_logs": True, "on_finish_action": "delete_succeeded_pod"}
    raise ValueError(f"unknown runner backend {backend!r}; expected one of {', '.join(BACKENDS)}")
