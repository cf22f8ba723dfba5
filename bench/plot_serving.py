"""Plot bench/results/serving.json: requests/s and p99 against connections (run in the ML venv)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(source: str, target: str) -> None:
    with open(source) as f:
        results = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, model in results["models"].items():
        for path in ("direct", "nginx", "direct_batching_off"):
            if path in model:
                xs = [r["connections"] for r in model[path]]
                axes[0].plot(xs, [r["rps"] for r in model[path]], marker="o", label=f"{name} {path}")
                axes[1].plot(xs, [r["p99_ms"] for r in model[path]], marker="o", label=f"{name} {path}")
    for ax, title in zip(axes, ("requests/s", "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Flywheel serving on 2 cores (server on CPU 0, wrk on CPU 1)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
