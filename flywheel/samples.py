"""Samples: demo and test datasets written from what scikit-learn ships (nothing is downloaded)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris(shuffle_seed: int | None = None):
    """Iris as a table with named columns and species names as labels."""
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    table = bunch.frame.rename(columns=dict(zip(bunch.feature_names, IRIS_COLUMNS)))
    table["species"] = [bunch.target_names[i] for i in bunch.target]
    table = table.drop(columns=["target"])
    if shuffle_seed is not None:
        table = table.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    return table


SAMPLES = {"iris": iris}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.samples", description=__doc__)
    parser.add_argument("name", choices=sorted(SAMPLES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="shuffle rows (a different upload, same data)")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    SAMPLES[args.name](args.seed).to_csv(args.output, index=False)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
