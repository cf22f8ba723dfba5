"""Benchmark: the platform's training path against `xgboost.train` alone, and the CNN's epoch time.

Needs the stack up (`make up`): the platform path reads the upload from MinIO and logs to MLflow.
Run: .venv/ml/bin/python bench/training_overhead.py [--rows 1000000] [--runs 3]

Side by side in one run, median of runs:
  direct    xgb.train on an in-memory DMatrix of the same training rows (same parameters, one thread)
  platform  flywheel.training.train.run: fetch the Parquet version from MinIO, validate, hash split, fit,
            score, log params/metrics/dataset/model to the stack's MLflow server, register, gate
            (in-process: no imports)
  step      `python -m flywheel.training.train` as Airflow runs it (adds interpreter start and imports)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
os.environ.setdefault("FLYWHEEL_PIPELINES_DIR", str(BENCH / "pipelines"))

from flywheel import frameworks  # noqa: E402
from flywheel.clients import objectstore  # noqa: E402
from flywheel.core import pipelines  # noqa: E402
from flywheel.core.settings import Settings  # noqa: E402
from flywheel.core.steps import StepSpec  # noqa: E402
from flywheel.core.upload import Upload  # noqa: E402
from flywheel.training import train  # noqa: E402


def synthetic(rows: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 30), dtype=np.float32)
    y = x[:, :5] @ np.array([3, -2, 1, 0.5, 2], dtype=np.float32) + rng.standard_normal(rows, dtype=np.float32)
    frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(30)])
    frame["y"] = y
    return frame


def direct(pipeline, frame) -> float:
    """xgb.train alone, on the very rows the platform trains on (its holdout left out, untimed)."""
    import xgboost as xgb

    params, rounds = frameworks.get("xgboost").booster_params(pipeline, 0)
    x, y = frame[list(pipeline.features)].to_numpy(), frame["y"].to_numpy()
    keep = ~train.holdout_mask(x, y, pipeline.holdout_fraction, pipeline.seed)
    x, y = x[keep], y[keep]
    started = time.perf_counter()
    dtrain = xgb.DMatrix(x, label=y)
    xgb.train(params, dtrain, num_boost_round=rounds)
    return time.perf_counter() - started


def cnn_epoch_seconds(epochs: int = 10) -> float:
    from flywheel.training import samples

    tf_framework = frameworks.get("tensorflow")

    digits = pipelines.get(Path(__file__).resolve().parent.parent / "pipelines", "digits")
    x, y = samples.digits()
    tf_framework.fit(digits, x[:100].astype("float32"), y[:100], 10)  # warm up: graph building
    started = time.perf_counter()
    tf_framework.fit(
        digits.__class__(**{**digits.__dict__, "params": {**digits.params, "epochs": epochs}}),
        x.astype("float32"),
        y,
        10,
    )
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args()
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, "synthetic")
    frame = synthetic(args.rows)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    body = buffer.getvalue()
    client = objectstore.client(settings, root=True)  # the upload, as a person makes it
    os.environ.update(settings.client_env())  # the in-process run logs to the stack's MLflow server, as the step does
    put = client.put_object("datasets", "synthetic/bench.parquet", io.BytesIO(body), len(body))
    upload = Upload("synthetic", "datasets", "synthetic/bench.parquet", put.etag, put.version_id or "")
    env = {**os.environ, **settings.client_env()}
    results = {"direct": [], "platform": [], "step": []}
    for run in range(args.runs):
        results["direct"].append(direct(pipeline, frame))
        started = time.perf_counter()
        train.run(settings, pipeline, upload)
        results["platform"].append(time.perf_counter() - started)
        started = time.perf_counter()
        spec = StepSpec("flywheel.training.train", {"pipeline": "synthetic", "upload": upload.to_dict()})
        subprocess.run(
            spec.command(str(settings.state / "bench-step-result.json"), sys.executable),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        results["step"].append(time.perf_counter() - started)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in results.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "rows": args.rows,
        "parquet_mib": round(len(body) / 2**20, 1),
        "median_s": {k: round(v, 2) for k, v in medians.items()},
        "platform_over_direct": round(medians["platform"] / medians["direct"], 2),
        "step_over_direct": round(medians["step"] / medians["direct"], 2),
    }
    if not args.skip_cnn:
        summary["cnn_epoch_s_digits"] = round(cnn_epoch_seconds(), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
