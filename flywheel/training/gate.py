"""Gate: decide whether a challenger replaces the production model (pure logic)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    metric: str,
    challenger: float,
    champion: float | None,
    *,
    higher_is_better: bool = True,
    floor: float | None = None,
    margin: float = 0.0,
) -> Decision:
    """Promote only if the challenger clears the floor and beats production by the margin.

    Both scores come from the same holdout. With margin 0 a tie promotes: at equal quality the
    model trained on the newer data wins. With no production model the floor alone decides.
    """
    better = ">=" if higher_is_better else "<="
    if challenger is None or math.isnan(challenger):
        return Decision(False, f"challenger {metric} is not a number")
    if floor is not None:
        clears = challenger >= floor if higher_is_better else challenger <= floor
        if not clears:
            return Decision(False, f"challenger {metric} {challenger:.4f} fails the floor ({better} {floor})")
    if champion is None or math.isnan(champion):
        return Decision(True, f"challenger {metric} {challenger:.4f} clears the floor and there is no production model")
    target = champion + margin if higher_is_better else champion - margin
    wins = challenger >= target if higher_is_better else challenger <= target
    if wins and challenger == target:
        return Decision(
            True,
            f"challenger {metric} {challenger:.4f} ties production {champion:.4f} + margin {margin} "
            f"(needs {better} {target:.4f}): the newer data wins a tie",
        )
    verdict = "beats" if wins else "does not beat"
    return Decision(
        wins,
        f"challenger {metric} {challenger:.4f} {verdict} production {champion:.4f} "
        f"by the margin {margin} (needs {better} {target:.4f})",
    )
