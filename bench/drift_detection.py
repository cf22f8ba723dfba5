"""Benchmark: how well the drift monitor's defaults separate "as trained" from "shifted", on real data.

No stack: the profile and the comparison are the monitor's own functions (core/profiles.py,
inference/drift.py). Run: .venv/ml/bin/python bench/drift_detection.py [--windows 200] [--rows 300]

Per data set shipped with scikit-learn, the profile is built from 75 % of the rows (as training
does), and windows draw `rows` answers with replacement:
  alarms (train) from the training rows themselves: the distribution the model learned, exactly
  alarms (held)  from the other 25 %, rows the model never saw: these sets are small (38-143 rows),
                 so a window repeats each row several times, and the held-out rows themselves differ
                 from the training rows by chance (KS D up to 0.17 on wine's hue): an upper bound
  shift k sd     the share of windows called drift when one feature (each in turn) is moved by
                 k of its standard deviations; the median over the features, with its range
  mix needed     the smallest share of shifted answers (1.5 sd, one feature) at which at least 90 %
                 of windows detect it: how far into a window a shift must be before the monitor sees it
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from flywheel.core import profiles
from flywheel.core.pipelines import Monitor
from flywheel.inference import drift


def datasets():
    from sklearn import datasets as sk

    for name, loader in (("iris", sk.load_iris), ("wine", sk.load_wine), ("breast_cancer", sk.load_breast_cancer)):
        data = loader()
        yield name, data.data, np.array(data.target_names)[data.target].astype(str), "classification"
    data = sk.load_diabetes()
    yield "diabetes", data.data, data.target, "regression"
    digits = sk.load_digits()
    summaries = profiles.image_summary(digits.images, 16)
    yield "digits (image summaries)", summaries, digits.target.astype(str), "classification"


def window(x, y, rows, rng, shift=None, mix=1.0):
    picked = rng.integers(0, len(x), rows)
    values = x[picked].copy()
    if shift is not None:
        column, by = shift
        moved = rng.random(rows) < mix
        values[moved, column] += by
    names = [f"f{i}" for i in range(x.shape[1])]
    columns = {n: values[:, i].tolist() for i, n in enumerate(names)}
    columns[profiles.PREDICTION] = y[picked].tolist()  # the predictions: the holdout's own labels stand in
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()
    rules = Monitor()
    print(f"defaults: alpha {rules.alpha}, min_distance {rules.min_distance}; {args.rows} answers per window")
    print(
        f"{'data':<26} {'features':>8} {'alarms (train)':>15} {'alarms (held)':>14} {'shift 0.5 sd':>16} "
        f"{'1 sd':>16} {'1.5 sd':>16} {'mix needed':>11}"
    )
    for name, x, y, task in datasets():
        x = np.asarray(x, dtype=np.float64)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(x))
        cut = int(len(x) * 0.75)
        train, live = order[:cut], order[cut:]
        names = [f"f{i}" for i in range(x.shape[1])]
        profile = profiles.build(names, x[train], y[train], task)
        xl, yl = x[live], y[live]
        seen = sum(
            drift.compare(profile, window(x[train], y[train], args.rows, rng), rules).detected
            for _ in range(args.windows)
        )
        alarms = sum(
            drift.compare(profile, window(xl, yl, args.rows, rng), rules).detected for _ in range(args.windows)
        )
        rates = {}
        per_feature = max(args.windows // 10, 10)
        for k in (0.5, 1.0, 1.5):
            found = []
            for column in range(x.shape[1]):
                by = k * x[train, column].std()
                hits = sum(
                    column_drifted(profile, window(xl, yl, args.rows, rng, (column, by)), rules, names[column])
                    for _ in range(per_feature)
                )
                found.append(hits / per_feature)
            rates[k] = f"{statistics.median(found):.0%} ({min(found):.0%}-{max(found):.0%})"
        needed = "-"
        for mix in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
            hits = []
            for column in range(x.shape[1]):
                by = 1.5 * x[train, column].std()
                hits.append(
                    sum(
                        column_drifted(profile, window(xl, yl, args.rows, rng, (column, by), mix), rules, names[column])
                        for _ in range(per_feature)
                    )
                    / per_feature
                )
            if statistics.median(hits) >= 0.9:
                needed = f"{mix:.0%}"
                break
        print(
            f"{name:<26} {x.shape[1]:>8} {seen / args.windows:>15.1%} {alarms / args.windows:>14.1%} "
            f"{rates[0.5]:>16} {rates[1.0]:>16} "
            f"{rates[1.5]:>16} {needed:>11}"
        )


def column_drifted(profile, columns, rules, name) -> bool:
    return name in drift.compare(profile, columns, rules).drifted


if __name__ == "__main__":
    main()
