"""Runner: where a step runs (core/steps.py), chosen by FLYWHEEL_RUNNER; never which tasks exist.

Every backend runs the same StepSpec and hands back the StepResult the step wrote to its result file:

- `local` (embedded mode): a process in the ML venv, forked by its warm step server (stepserver.py)
  or, where none answers, a subprocess started cold; its output streams into the task log;
- `docker`: a container of the trainer image on the stack's network (the Docker SDK); the result
  file is copied out of the container once it exits;
- `kubernetes`: a pod of the trainer image (KubernetesPodOperator, run by the task); the result
  file is the pod's XCom file, which the operator's sidecar reads.

The DAGs are the same whatever the backend: one task per step, which calls `run` and decides from
the result (tasks.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from pathlib import Path

from flywheel.core import steps
from flywheel.core.settings import Settings
from flywheel.core.steps import FAILED, StepResult, StepSpec

BACKENDS = ("local", "docker", "kubernetes")
TRAINER_IMAGE = "flywheel/trainer:latest"  # built from services/trainer/Dockerfile
NETWORK = "flywheel"  # docker-compose.yml's network: the services' names resolve on it
CONTAINER_RESULT = "/tmp/flywheel-result.json"
KUBERNETES_XCOM = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads XCom
BACKGROUND_NICE = 10  # a background step's nice level (local)...
BACKGROUND_CPU_SHARES = 256  # ...and CPU weight against Docker's 1,024 (docker); pods: their requests


def backend() -> str:
    """The configured backend: FLYWHEEL_RUNNER, `local` unless compose or Kubernetes set it."""
    name = os.environ.get("FLYWHEEL_RUNNER", "local")
    if name not in BACKENDS:
        raise ValueError(f"FLYWHEEL_RUNNER is {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def container_env(settings: Settings) -> dict[str, str]:
    """A step's environment in a container or pod: the ML identity and where the services are.

    Paths of this machine (the repo, the venvs) mean nothing there: the image has its own.
    """
    return {
        k: v
        for k, v in settings.client_env().items()
        if not k.startswith("FLYWHEEL_") or k in ("FLYWHEEL_STATE_DIR", "FLYWHEEL_ML_SECRET_KEY") or k.endswith("_HOST")
    }


def _missing(spec: StepSpec, how: str, tail: list[str]) -> StepResult:
    lines = " | ".join(tail[-5:])
    return StepResult(FAILED, f"{spec.module} {how} without writing its result: {lines}")


# What a step keeps of its task's environment: nothing of Airflow's (its secrets, its database), only
# what a process needs to run, and the settings' client environment (the ML identity, where things are).
INHERITED = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def step_env(settings: Settings) -> dict[str, str]:
    """A step reads no `.env` either (FLYWHEEL_ENV_FILE=none): its secrets are the ML identity's and
    MLflow's service account's, in client_env, and nothing else."""
    kept = {k: v for k, v in os.environ.items() if k in INHERITED}
    return {**kept, **settings.client_env(), "PYTHONUNBUFFERED": "1", "FLYWHEEL_ENV_FILE": "none"}


STALE_RESULTS = 24 * 3600  # a result folder its task never removed (killed -9) goes after a day


def _results_folder(settings: Settings) -> Path:
    """Where a warm step's result file goes: the state folder, which the server's children can write
    (compose: the volume both containers mount). What killed tasks left there goes after a day."""
    folder = settings.state / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_RESULTS:
                shutil.rmtree(old)
    return folder


def run_warm(settings: Settings, spec: StepSpec) -> StepResult | None:
    """The step as a child of the warm step server (stepserver.py), or None if it never started
    there (no server answers, or it went away before forking): then it runs cold."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(settings.step_socket))
    except OSError:
        conn.close()
        return None
    tail: deque[str] = deque(maxlen=20)
    results = _results_folder(settings)
    with conn, conn.makefile("rb") as answers, tempfile.TemporaryDirectory(prefix="flywheel-step-", dir=results) as tmp:
        result_path = str(Path(tmp) / "result.json")
        request = {
            "argv": spec.command(result_path)[1:],
            "env": step_env(settings),
            "cwd": os.getcwd(),
            "nice": BACKGROUND_NICE if spec.background else 0,
        }
        read_end, write_end = os.pipe()
        try:
            socket.send_fds(conn, [json.dumps(request).encode()], [write_end])
        except OSError:
            os.close(read_end)
            return None
        finally:
            os.close(write_end)
        started = answers.readline()
        if not started:
            os.close(read_end)
            return None
        pid = json.loads(started)["pid"]
        print(f"[runner] {spec.module} runs warm: process {pid}, forked by the step server", flush=True)
        with os.fdopen(read_end, errors="replace") as output:
            for line in output:
                sys.stdout.write(line)
                tail.append(line.rstrip("\n"))
        ended = answers.readline()
        result = steps.read(result_path)
    how = f"exited {json.loads(ended)['exit']}" if ended else "was killed"
    return result or _missing(spec, how, list(tail))


def run_local(settings: Settings, spec: StepSpec) -> StepResult:
    """Warm when the step server answers; else a subprocess of its own."""
    warm = run_warm(settings, spec)
    if warm is not None:
        return warm
    env = step_env(settings)
    tail: deque[str] = deque(maxlen=20)
    with tempfile.TemporaryDirectory(prefix="flywheel-step-") as tmp:
        result_path = str(Path(tmp) / "result.json")
        command = spec.command(result_path, str(settings.venv_ml / "bin" / "python"))
        nice = (lambda: os.nice(BACKGROUND_NICE)) if spec.background else None
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=nice
        ) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                tail.append(line.rstrip("\n"))
        result = steps.read(result_path)
    return result or _missing(spec, f"exited {proc.returncode}", list(tail))


def run_docker(settings: Settings, spec: StepSpec, image: str = TRAINER_IMAGE) -> StepResult:
    import docker

    client = docker.from_env()
    container = client.containers.run(
        image,
        spec.command(CONTAINER_RESULT),
        environment={**container_env(settings), "PYTHONUNBUFFERED": "1", "FLYWHEEL_ENV_FILE": "none"},
        network=NETWORK,
        volumes=shared_mounts(client, settings),
        detach=True,
        labels={"flywheel.step": spec.module},
        cpu_shares=BACKGROUND_CPU_SHARES if spec.background else None,
    )
    print(f"[runner] {spec.module} runs in container {container.short_id} of {image}", flush=True)
    tail: deque[str] = deque(maxlen=20)
    try:
        for chunk in container.logs(stream=True, follow=True):
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            tail.extend(text.splitlines())
        status = container.wait()["StatusCode"]
        try:
            bits, stat = container.get_archive(CONTAINER_RESULT)
        except docker.errors.NotFound:
            return _missing(spec, f"exited {status}", list(tail))
        with tarfile.open(fileobj=io.BytesIO(b"".join(bits))) as archive:
            return StepResult.from_json(archive.extractfile(stat["name"]).read())
    finally:
        container.remove(force=True)


def shared_mounts(client, settings: Settings) -> dict[str, dict]:
    """Run by a task in a container (compose), a step mounts two of that container's mounts: the state
    volume (the Bento store a build writes to) and the pipeline files, live; no other (the secrets)."""
    if not Path("/.dockerenv").exists():
        return {}
    wanted = {str(settings.state), str(settings.pipelines_dir)}
    own = client.containers.get(os.environ["HOSTNAME"]).attrs["Mounts"]
    return {
        m.get("Name") or m["Source"]: {"bind": m["Destination"], "mode": "rw" if m.get("RW") else "ro"}
        for m in own
        if m["Destination"] in wanted
    }


def run_kubernetes(settings: Settings, spec: StepSpec, image: str = TRAINER_IMAGE) -> StepResult:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import get_current_context

    command = spec.command(KUBERNETES_XCOM)
    name = spec.module.rsplit(".", 1)[-1].replace("_", "-")
    pod = KubernetesPodOperator(
        task_id=f"{name}-pod",
        name=name,
        image=image,
        cmds=command[:3],
        arguments=command[3:],  # no shell between us and the step: arguments stay exactly as given
        env_vars={**container_env(settings), "FLYWHEEL_ENV_FILE": "none"},
        do_xcom_push=True,  # its sidecar reads the result file, and execute() returns it parsed
        get_logs=True,
        on_finish_action="delete_pod",
    )
    try:
        value = pod.execute(get_current_context())
    except Exception as exc:  # the pod failed, or never ran: its logs are in the task log above
        return StepResult(FAILED, f"{spec.module} pod failed: {exc}")
    return StepResult.from_json(json.dumps(value)) if value else _missing(spec, "ended", [])


def run(settings: Settings, spec: StepSpec, backend_name: str | None = None) -> StepResult:
    """Run the step where the configured backend says, and return what it wrote."""
    name = backend_name or backend()
    if name == "docker":
        return run_docker(settings, spec)
    if name == "kubernetes":
        return run_kubernetes(settings, spec)
    return run_local(settings, spec)
