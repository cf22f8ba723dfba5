"""The raw model in-process: single-row predictions in a loop, no server (run in the ML venv).

.venv/ml/bin/python bench/raw_predict.py BENTO_MODEL_TAG [--seconds 5]   -> one JSON line
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_tag")
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    import bentoml

    ref = bentoml.models.get(args.model_tag)
    if Path(ref.path_of("model.ubj")).exists():
        import xgboost

        booster = xgboost.Booster(model_file=ref.path_of("model.ubj"))
        booster.set_param({"nthread": 1})
        n = booster.num_features()
        row = np.zeros((1, n), dtype=np.float32)

        def call():
            booster.inplace_predict(row)
    else:
        import keras

        model = keras.models.load_model(next(Path(ref.path).glob("*.keras")))
        h, w = model.input_shape[1:3]
        row = np.zeros((1, h, w), dtype=np.float32)

        def call():
            model(row, training=False)

    for _ in range(50):
        call()
    latencies = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    lat = np.array(latencies) * 1e6
    print(
        json.dumps(
            {
                "rps": len(lat) / lat.sum() * 1e6,
                "p50_us": float(np.percentile(lat, 50)),
                "p99_us": float(np.percentile(lat, 99)),
                "requests": len(lat),
            }
        )
    )


if __name__ == "__main__":
    main()
