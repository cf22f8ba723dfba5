"""Runner: run a flywheel step in the ML environment, outside Airflow's, and read its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque

from flywheel.settings import Settings


class StepFailed(RuntimeError):
    """The step exited non-zero; the message carries its own reason."""


class DatasetRejected(StepFailed):
    """The step refused the dataset (exit code 2): retrying cannot help."""



def run_step(settings: Settings, module: str, *args: str) -> dict:
    """`python -m flywheel.<module> ARGS` in the ML venv; its output streams into the task log.

    The step prints its result as one JSON object on its last stdout line.
    """
    command = [str(settings.venv_ml / "bin" / "python"), "-m", f"flywheel.{module}", *args]
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
        raise StepFailed(f"flywheel.{module} exited {proc.returncode}: " + " | ".join(list(tail)[-5:]))
    for line in reversed(tail):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed(f"flywheel.{module} printed no JSON result")
