"""The live rollout's decisions, on figures given here (the e2e tests take them from the real stack)."""

import math

from flywheel.core.pipelines import Pipeline, Rollout
from flywheel.serving import live

IRIS = Pipeline("iris", "iris/", "csv", "classification", "xgboost", "accuracy")
CANARY = Rollout(strategy="canary", steps=(10, 100), bake_seconds=5, min_requests=20, min_feedback=10)


def arm(version, requests=100, error_ratio=0.0, p99_ms=5.0, rows=0, score=None, loss=(0.0, 0.0)):
    labelled = {"rows": rows, "score": score, "loss_mean": loss[0], "loss_var": loss[1]} if rows else {}
    return {
        "version": version,
        "requests": requests,
        "error_ratio": error_ratio,
        "failure_ratio": error_ratio,
        "p99_ms": p99_ms,
        "live": labelled,
    }


def figures(production, candidate, shadow=None):
    return {
        "arms": {"production": production, "candidate": candidate},
        "seconds": 10,
        "shadow": shadow or {"requests": 0, "rows": 0, "disagreement": None, "versions": []},
    }


def test_a_candidate_as_good_as_production_passes():
    assert live.guardrails(IRIS, CANARY, figures(arm("1", rows=50, score=0.95), arm("2", rows=40, score=0.93))) == []


def test_each_guardrail_names_its_figures():
    worse = figures(
        arm("1", rows=50, score=0.95, loss=(0.05, 0.048)),
        arm("2", error_ratio=0.2, p99_ms=400, rows=40, score=0.6, loss=(0.4, 0.246)),
    )
    failed = live.guardrails(IRIS, CANARY, worse)
    assert len(failed) == 3
    assert "error ratio 0.200" in failed[0] and "p99 400.0 ms" in failed[1] and "live accuracy 0.600" in failed[2]


def test_the_live_score_waits_for_enough_labels_on_both_arms():
    few = figures(arm("1", rows=50, score=0.95), arm("2", rows=5, score=0.0))
    assert live.guardrails(IRIS, CANARY, few) == []


def test_lower_is_better_metrics_point_the_other_way():
    rmse = Pipeline("d", "d/", "csv", "regression", "xgboost", "rmse")
    config = Rollout(strategy="canary", live_score_drop=1.0, min_feedback=10)
    prod = arm("1", rows=200, score=50.0, loss=(2500.0, 1e5))
    assert live.guardrails(rmse, config, figures(prod, arm("2", rows=200, score=60.0, loss=(3600.0, 1e5))))
    assert not live.guardrails(rmse, config, figures(prod, arm("2", rows=200, score=49.5, loss=(2450.0, 1e5))))


def test_a_drop_that_few_rows_cannot_tell_from_chance_does_not_roll_back():
    """Two equally good models (2 % wrong) differ by 0.08 on 20 labelled rows when 2 of them land on one
    arm's wrong answers: not a rollback. The same drop on 2,000 rows each is one."""
    prod = arm("1", rows=200, score=0.98, loss=(0.02, 0.0197))
    chance = arm("2", rows=20, score=0.90, loss=(0.10, 0.0947))
    assert live.guardrails(IRIS, CANARY, figures(prod, chance)) == []
    many = figures(
        arm("1", rows=2000, score=0.98, loss=(0.02, 0.0196)), arm("2", rows=2000, score=0.90, loss=(0.10, 0.09))
    )
    assert "live accuracy 0.900" in live.guardrails(IRIS, CANARY, many)[0]


def test_a_step_waits_for_its_bake_time_and_its_requests():
    state = live.State("iris", "canary", "2", "1", "canary", 0, 10, 0.0, 100.0, 100.0)
    fig = figures(arm("1"), arm("2", requests=30))
    assert live.step_done(CANARY, state, fig, now=103.0) == (False, "baking: 3 of 5 s")
    assert live.step_done(CANARY, state, figures(arm("1"), arm("2", requests=3)), now=110.0)[0] is False
    assert live.step_done(CANARY, state, fig, now=110.0) == (True, "")


def test_welch_sees_a_real_difference_and_not_noise():
    # 0/1 losses: production wrong 10 % of 600 rows, candidate wrong 20 % of 600.
    worse = live.welch(
        {"rows": 600, "loss_mean": 0.2, "loss_var": 0.16}, {"rows": 600, "loss_mean": 0.1, "loss_var": 0.09}
    )
    assert worse["z"] < 0 and worse["p_value"] < 0.001
    same = live.welch(
        {"rows": 600, "loss_mean": 0.1, "loss_var": 0.09}, {"rows": 600, "loss_mean": 0.105, "loss_var": 0.094}
    )
    assert same["p_value"] > 0.5
    assert math.isclose(
        live.welch({"rows": 5, "loss_mean": 0, "loss_var": 0}, {"rows": 5, "loss_mean": 0, "loss_var": 0})["p_value"],
        1.0,
    )
