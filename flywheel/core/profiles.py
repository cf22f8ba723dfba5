"""A version's reference profile: what its training data looked like, for drift to be measured against.

Written at training time as an MLflow artifact of the version's run (PROFILE_ARTIFACT), read by the
monitor (inference/drift.py). Plain JSON:

    {"rows": n, "task": ..., "features": {name: {"kind": "numeric", "sample": [...], "mean", "std",
     "quantiles": [q0, q10, ..., q100]}}, "prediction": {"kind": "categorical", "frequencies": {class: share}}
     or {"kind": "numeric", "sample": [...], ...}}

Tables profile their declared features. Images profile three numbers per image, which the Bento
also spools for every answered image instead of its pixels (IMAGE_FEATURES): inverted, brighter,
thicker or shifted-off-the-frame digits move them. The prediction profile is the model's own
predictions on the holdout: what it answers on data like its training data.

numpy only, imported when called: the Bento (image summaries) and the ML steps use it; Airflow's
environment only reads the constants.
"""

from __future__ import annotations

PROFILE_ARTIFACT = "flywheel/profile.json"
IMAGE_FEATURES = ("pixel_mean", "pixel_std", "ink_fraction")
SAMPLE = 2000  # values kept per feature: enough for a two-sample test, small as an artifact
PREDICTION = "prediction"


def image_summary(batch, max_value: float):
    """Per image, scaled to [0, 1]: mean intensity, its spread, and the share of pixels over half scale."""
    import numpy as np

    flat = np.asarray(batch, dtype=np.float32).reshape(len(batch), -1) / float(max_value)
    return np.stack([flat.mean(axis=1), flat.std(axis=1), (flat > 0.5).mean(axis=1)], axis=1)


def numeric(values, sample: int = SAMPLE, seed: int = 0) -> dict:
    import numpy as np

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    picked = finite
    if len(finite) > sample:
        picked = np.random.default_rng(seed).choice(finite, sample, replace=False)
    return {
        "kind": "numeric",
        "count": len(values),
        "missing": int(len(values) - len(finite)),
        "mean": float(finite.mean()) if len(finite) else None,
        "std": float(finite.std()) if len(finite) else None,
        "quantiles": np.quantile(finite, np.linspace(0, 1, 11)).tolist() if len(finite) else [],
        # As float32, the precision models see: the monitor compares live values at the same precision,
        # so a value's ties are not split by rounding (a binary feature would look 50 % drifted).
        "sample": [float(v) for v in picked.astype(np.float32)],
    }


def categorical(values) -> dict:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    total = sum(counts.values()) or 1
    return {"kind": "categorical", "count": total, "frequencies": {k: n / total for k, n in sorted(counts.items())}}


def build(features: list[str], x, predictions, task: str) -> dict:
    """The profile of training inputs `x` (rows x features, or the image summaries) and of the
    model's predictions on the holdout."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return {
        "rows": len(x),
        "task": task,
        "features": {name: numeric(x[:, i], seed=i) for i, name in enumerate(features)},
        PREDICTION: categorical(predictions) if task == "classification" else numeric(predictions),
    }
