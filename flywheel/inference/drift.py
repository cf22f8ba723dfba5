"""Drift: a window of live answers against the serving version's training profile, feature by feature.

The tests are scipy's, chosen over Evidently and alibi-detect: scipy is already in the ML
environment (scikit-learn needs it), its two-sample tests are the ones those libraries run for
tabular data, and Evidently would add ~40 packages with pins of their own to the lock for the same
two tests. Per feature:

- numbers: the two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`); distance D, the
  largest gap between the two empirical distributions (0..1);
- classes (a classifier's predictions): Pearson's chi-square test of the window's counts against
  the profile's shares (`scipy.stats.chisquare`); distance: total variation (0..1).

A feature drifts when both say so: p < alpha / features (Bonferroni), and distance >= min_distance.
The test alone is too eager on thousands of rows, the distance alone too eager on a few dozen.
The HTML report draws both distributions of every feature (matplotlib): a person would rather look.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field

from flywheel.core.pipelines import Monitor
from flywheel.core.profiles import PREDICTION


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    test: str  # ks | chi2
    distance: float
    p_value: float
    drifted: bool
    live_mean: float | None = None
    reference_mean: float | None = None


@dataclass(frozen=True)
class Result:
    rows: int
    decided: bool  # False: too few rows in the window to say anything
    detected: bool
    reason: str
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    def to_dict(self) -> dict:
        return {**asdict(self), "drifted": self.drifted}


def _numeric(name: str, reference: dict, live, alpha: float, min_distance: float) -> FeatureDrift:
    import numpy as np
    from scipy import stats

    # Both at float32, the precision of the profile's sample (core/profiles.py) and of the models.
    live = np.asarray(live, dtype=np.float32).astype(np.float64)
    live = live[np.isfinite(live)]
    sample = np.asarray(reference["sample"], dtype=np.float32).astype(np.float64)
    if not len(live) or not len(sample):
        return FeatureDrift(name, "ks", 0.0, 1.0, False)
    test = stats.ks_2samp(sample, live)
    distance, p = float(test.statistic), float(test.pvalue)
    return FeatureDrift(
        name, "ks", distance, p, p < alpha and distance >= min_distance, float(live.mean()), reference.get("mean")
    )


def _categorical(name: str, reference: dict, live, alpha: float, min_distance: float) -> FeatureDrift:
    from scipy import stats

    shares = dict(reference["frequencies"])
    counts: dict[str, int] = {}
    for v in live:
        counts[str(v)] = counts.get(str(v), 0) + 1
    n = sum(counts.values())
    if not n:
        return FeatureDrift(name, "chi2", 0.0, 1.0, False)
    classes = sorted(set(shares) | set(counts))
    # A class the profile never saw gets a small expected share, so the test stays defined.
    floor = 0.5 / max(reference.get("count", 1), 1)
    expected = [max(shares.get(c, 0.0), floor) for c in classes]
    total = sum(expected)
    expected = [e / total * n for e in expected]
    observed = [counts.get(c, 0) for c in classes]
    p = float(stats.chisquare(observed, expected).pvalue)
    distance = 0.5 * sum(abs(counts.get(c, 0) / n - shares.get(c, 0.0)) for c in classes)
    return FeatureDrift(name, "chi2", float(distance), p, p < alpha and distance >= min_distance)


def compare(profile: dict, columns: dict[str, list], rules: Monitor) -> Result:
    """The window (`columns`: feature -> live values, and PREDICTION -> the answers) against the profile."""
    rows = max((len(v) for v in columns.values()), default=0)
    if rows < rules.min_rows:
        return Result(rows, False, False, f"{rows} answers in the window, fewer than the {rules.min_rows} it needs")
    references = {**profile["features"], PREDICTION: profile[PREDICTION]}
    alpha = rules.alpha / max(len(references), 1)
    found = []
    for name, reference in references.items():
        if name not in columns:
            continue
        judge = _categorical if reference["kind"] == "categorical" else _numeric
        found.append(judge(name, reference, columns[name], alpha, rules.min_distance))
    drifted = [f for f in found if f.drifted]
    if drifted:
        reason = "drift in " + ", ".join(f"{f.feature} ({f.test} distance {f.distance:.2f})" for f in drifted)
    else:
        reason = f"no drift over {rows} answers"
    return Result(rows, True, bool(drifted), reason, found)


def _figure(name: str, reference: dict, live) -> str:
    """One feature's two distributions as an inline PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=90)
    try:
        if reference["kind"] == "categorical":
            counts: dict[str, int] = {}
            for v in live:
                counts[str(v)] = counts.get(str(v), 0) + 1
            n = max(sum(counts.values()), 1)
            classes = sorted(set(reference["frequencies"]) | set(counts))
            at = np.arange(len(classes))
            ax.bar(at - 0.2, [reference["frequencies"].get(c, 0.0) for c in classes], 0.4, label="training")
            ax.bar(at + 0.2, [counts.get(c, 0) / n for c in classes], 0.4, label="live")
            ax.set_xticks(at, classes, rotation=30, fontsize=7)
        else:
            sample = np.asarray(reference["sample"], dtype=np.float64)
            values = np.asarray(live, dtype=np.float64)
            values = values[np.isfinite(values)]
            both = np.concatenate([sample, values]) if len(values) else sample
            bins = np.histogram_bin_edges(both, bins=30)
            ax.hist(sample, bins=bins, density=True, alpha=0.55, label="training")
            if len(values):
                ax.hist(values, bins=bins, density=True, alpha=0.55, label="live")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def report(title: str, profile: dict, columns: dict[str, list], result: Result) -> str:
    """A standalone HTML page: the verdict, a table of every test, and both distributions per feature."""
    references = {**profile["features"], PREDICTION: profile[PREDICTION]}
    rows = "".join(
        f"<tr{' class=drift' if f.drifted else ''}><td>{html.escape(f.feature)}</td><td>{f.test}</td>"
        f"<td>{f.distance:.3f}</td><td>{f.p_value:.2e}</td><td>{'drift' if f.drifted else 'ok'}</td></tr>"
        for f in result.features
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(f.feature)}" src="data:image/png;base64,'
        f'{_figure(f.feature, references[f.feature], columns.get(f.feature, []))}"></figure>'
        for f in result.features
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
        "tr.drift{background:#fdd}figure{display:inline-block;margin:.5em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p><b>{html.escape(result.reason)}</b> "
        f"({result.rows} answers; training profile of {profile.get('rows', '?')} rows)</p>"
        "<table><tr><th>feature</th><th>test</th><th>distance</th><th>p-value</th><th></th></tr>"
        f"{rows}</table>{figures}</body></html>"
    )
