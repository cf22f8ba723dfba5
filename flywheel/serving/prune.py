"""Prune (a step): the BentoML store keeps the Bentos and model copies of the versions that may serve.

`python -m flywheel.serving.prune --args '{"plan": {"iris": {"keep": ["7", "8"], "newest": 5}}}'`: for
each pipeline, every version in `keep` (production, previous, what serves) and the `newest` others;
the rest go, with their build folders (operations/retention.py makes the plan).
"""

from __future__ import annotations

import os
import shutil
import sys

from flywheel.core import steps
from flywheel.core.settings import Settings
from flywheel.serving.build import bento_tag, model_tag


def _versions(items, prefix: str) -> set[int]:
    return {
        int(str(i.tag.version)[1:]) for i in items if str(i.tag.version).startswith("v") and str(i.tag.name) == prefix
    }


def prune(plan: dict) -> dict:
    """Delete what the plan does not keep; say what went and what stayed."""
    settings = Settings.load()
    os.environ.setdefault("BENTOML_HOME", str(settings.bentoml_home))
    import bentoml

    deleted, kept = [], []
    # The whole store, filtered here: listing by a name nothing was built under raises NotFound.
    all_bentos, all_models = bentoml.bentos.list(), bentoml.models.list()
    for pipeline, rule in plan.items():
        bentos = _versions(all_bentos, f"flywheel-{pipeline}")
        models = _versions(all_models, pipeline)
        protected = {int(v) for v in rule["keep"]}
        newest = sorted((bentos | models) - protected, reverse=True)[: int(rule["newest"])]
        for version in sorted(bentos | models):
            if version in protected or version in newest:
                kept.append(f"{pipeline} v{version}")
                continue
            if version in bentos:
                bentoml.bentos.delete(bento_tag(pipeline, str(version)))
            if version in models:
                bentoml.models.delete(model_tag(pipeline, str(version)))
            shutil.rmtree(settings.state / "bento-builds" / f"{pipeline}-v{version}", ignore_errors=True)
            deleted.append(f"{pipeline} v{version}")
    return {"deleted": deleted, "kept": kept}


if __name__ == "__main__":
    sys.exit(steps.main(prune))
