"""Steps: what runs in the ML environment, how it is called, and the result it hands back.

A step is `python -m <module> --args JSON --result PATH`, wherever it runs: a subprocess of the
Airflow task (local), a container (docker) or a pod (kubernetes). Its outcome is a StepResult written
to PATH, and read back by the runner with `read`, never parsed from its output:

- `ok`: the payload is the step's answer;
- `rejected`: the input is bad (a dataset that breaks a rule) and no retry can change that;
- `failed`: something went wrong that a retry may fix (MLflow away, a killed process).

A step whose process dies before writing one has failed, and the runner says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.core.errors import DatasetInvalid

OK, REJECTED, FAILED = "ok", "rejected", "failed"
STATUSES = (OK, REJECTED, FAILED)


@dataclass(frozen=True)
class StepResult:
    status: str
    reason: str = ""
    payload: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"step status {self.status!r}; expected one of {', '.join(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> StepResult:
        data = json.loads(text)
        return cls(str(data["status"]), str(data.get("reason") or ""), dict(data.get("payload") or {}))


def write(result: StepResult, path: str | Path) -> None:
    """Written whole or not at all: a reader never sees half a result."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result.to_json())
    os.replace(tmp, path)


def read(path: str | Path) -> StepResult | None:
    """The result a step wrote, or None if it wrote none (it died first)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return StepResult.from_json(text) if text.strip() else None


@dataclass(frozen=True)
class StepSpec:
    """What runs, whatever runs it: a module of the ML environment and its arguments (JSON-able)."""

    module: str
    args: dict = field(default_factory=dict)
    # Background work (the drift monitor) yields the CPU to serving: a nice level where it runs as a
    # process, a smaller CPU share where it runs as a container.
    background: bool = False

    def command(self, result_path: str, python: str = "python") -> list[str]:
        return [python, "-m", self.module, "--args", json.dumps(self.args), "--result", result_path]


def main(step: Callable[..., dict], argv: list[str] | None = None) -> int:
    """A step's entry point: `step(**args)` returns its payload; DatasetInvalid rejects, anything else fails.

    Exit status 0 for ok and rejected (the step did its job: it answered), 1 for failed, so that a
    container or pod that failed shows as such in Docker and Kubernetes too.
    """
    parser = argparse.ArgumentParser(description=(step.__doc__ or "").splitlines()[0] if step.__doc__ else None)
    parser.add_argument("--args", default="{}", help="the step's arguments, as a JSON object")
    parser.add_argument("--result", required=True, help="where to write the StepResult (JSON)")
    options = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = StepResult(OK, payload=step(**json.loads(options.args)))
    except DatasetInvalid as exc:
        print(f"rejected: {exc}", file=sys.stderr, flush=True)
        result = StepResult(REJECTED, str(exc))
    except Exception as exc:
        traceback.print_exc()
        result = StepResult(FAILED, f"{type(exc).__name__}: {exc}"[:4000])
    write(result, options.result)
    return 1 if result.status == FAILED else 0
