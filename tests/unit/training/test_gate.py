"""The champion/challenger gate's decisions."""

import math

import pytest

from flywheel.training.gate import decide


@pytest.mark.parametrize(
    ("challenger", "champion", "floor", "margin", "promote"),
    [
        (0.95, None, 0.8, 0.0, True),  # no production yet: the floor decides
        (0.75, None, 0.8, 0.0, False),  # below the floor, even with nothing in production
        (0.95, 0.90, 0.8, 0.0, True),  # beats production
        (0.90, 0.90, 0.8, 0.0, True),  # a tie with margin 0: the newer data wins
        (0.90, 0.90, 0.8, 0.01, False),  # a tie does not beat production by a margin
        (0.905, 0.90, 0.8, 0.01, False),  # better, but by less than the margin
        (0.91, 0.90, 0.8, 0.01, True),  # exactly the margin
        (0.85, 0.95, 0.8, 0.0, False),  # worse than production
        (0.79, 0.70, 0.8, 0.0, False),  # beats a weak production but fails the floor
        (0.5, None, None, 0.0, True),  # no floor declared
    ],
)
def test_higher_is_better(challenger, champion, floor, margin, promote):
    decision = decide("accuracy", challenger, champion, floor=floor, margin=margin)
    assert decision.promote is promote
    assert "accuracy" in decision.reason


@pytest.mark.parametrize(
    ("challenger", "champion", "promote"),
    [(50.0, 55.0, True), (55.0, 55.0, True), (56.0, 55.0, False), (80.0, None, False), (60.0, None, True)],
)
def test_lower_is_better(challenger, champion, promote):
    assert decide("rmse", challenger, champion, higher_is_better=False, floor=75.0).promote is promote


def test_reason_names_both_scores():
    reason = decide("accuracy", 0.85, 0.95, floor=0.8, margin=0.01).reason
    assert "0.8500" in reason and "0.9500" in reason and "does not beat" in reason


def test_nan_challenger_is_never_promoted():
    assert not decide("accuracy", math.nan, None).promote


def test_unscorable_production_counts_as_none():
    assert decide("accuracy", 0.9, math.nan, floor=0.8).promote


def test_a_tie_says_so():
    reason = decide("accuracy", 0.9706, 0.9706, floor=0.8).reason
    assert "ties production" in reason and "newer data" in reason and "beats" not in reason
