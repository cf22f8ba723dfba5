"""Samples: demo and test datasets written from what scikit-learn ships (nothing is downloaded)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
DIABETES_COLUMNS = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def _shuffled(table, seed):
    return table if seed is None else table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def iris(seed: int | None = None):
    """Iris with named columns and species names as labels."""
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    table = bunch.frame.rename(columns=dict(zip(bunch.feature_names, IRIS_COLUMNS)))
    table["species"] = [bunch.target_names[i] for i in bunch.target]
    return _shuffled(table.drop(columns=["target"]), seed)


def wine(seed: int | None = None):
    """Wine: thirteen chemical measurements (column names as scikit-learn ships them) and the cultivar."""
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    table = bunch.frame.rename(columns={"od280/od315_of_diluted_wines": "od280_od315"})
    table["cultivar"] = [bunch.target_names[i] for i in bunch.target]
    return _shuffled(table.drop(columns=["target"]), seed)


def diabetes(seed: int | None = None):
    """Diabetes progression: ten scaled baseline measurements and the target a year later."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(as_frame=True)
    table = bunch.frame.rename(columns={"target": "progression"})
    return _shuffled(table[[*DIABETES_COLUMNS, "progression"]], seed)


def digits(seed: int | None = None):
    """8x8 handwritten digits (values 0..16) as (x, y) arrays."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = bunch.images.astype("uint8"), bunch.target.astype("int64")
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    return x, y


def mnist(seed: int | None = None):
    """MNIST-format 28x28 images (values 0..255) made from the 8x8 digits: each pixel a 3x3 block,
    centred with a 2-pixel border, as MNIST centres its digits in a 28x28 field."""
    import numpy as np

    x, y = digits(seed)
    big = np.kron(x.astype(np.float32) * (255 / 16), np.ones((1, 3, 3), dtype=np.float32))
    return np.pad(big, ((0, 0), (2, 2), (2, 2))).round().astype(np.uint8), y


MNIST_PARTS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def write(name: str, output: Path, seed: int | None = None, shuffle_labels: bool = False) -> Path:
    """Write a sample in its pipeline's format: iris CSV, diabetes Parquet, digits NPZ, mnist an IDX
    set (a folder: images, labels, then the `_SUCCESS` marker that starts the run)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if name == "mnist":
        import numpy as np

        from flywheel.core.pipelines import READY_MARKER
        from flywheel.training import images

        x, y = mnist(seed)
        if shuffle_labels:
            y = np.random.default_rng(0).permutation(y)
        output.mkdir(parents=True, exist_ok=True)
        for part, blob in zip(MNIST_PARTS, images.write_idx(x, y)):
            (output / part).write_bytes(blob)
        (output / READY_MARKER).write_bytes(b"")
        return output
    if name == "digits":
        import numpy as np

        from flywheel.training import images

        x, y = digits(seed)
        if shuffle_labels:  # a worse upload: same images, labels scrambled
            y = np.random.default_rng(0).permutation(y)
        output.write_bytes(images.write_npz(x, y))
        return output
    table = {"iris": iris, "wine": wine, "diabetes": diabetes}[name](seed)
    if shuffle_labels:
        target = table.columns[-1]
        table[target] = table[target].sample(frac=1.0, random_state=0).to_numpy()
    if name == "diabetes":
        table.to_parquet(output, index=False)
    else:
        table.to_csv(output, index=False)
    return output


def make(settings, name: str, output: Path, seed: int | None = None) -> Path:
    """Write a sample from any environment: scikit-learn's data lives in the ML one, so it runs there."""
    command = [str(settings.venv_ml / "bin" / "python"), "-m", "flywheel.training.samples", name, str(output)]
    if seed is not None:
        command += ["--seed", str(seed)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.training.samples", description=__doc__)
    parser.add_argument("name", choices=["iris", "wine", "diabetes", "digits", "mnist"])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="shuffle rows (a different upload, same data)")
    parser.add_argument("--shuffle-labels", action="store_true", help="scramble the labels: a worse dataset")
    args = parser.parse_args(argv)
    print(write(args.name, args.output, args.seed, args.shuffle_labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
