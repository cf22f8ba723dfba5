"""Rollout's pure parts: the score a holdout replay is judged by, the names of replica groups."""

import pytest

from flywheel.core.scores import score
from flywheel.platform import deployments


def test_replay_accuracy_compares_labels_as_text():
    assert score("accuracy", ["3", "1", "2"], [3, 1, 0]) == pytest.approx(2 / 3)


def test_replay_regression_metrics():
    assert score("rmse", [1.0, 3.0], [2.0, 2.0]) == pytest.approx(1.0)
    assert score("mae", [1.0, 4.0], [2.0, 2.0]) == pytest.approx(1.5)
    assert score("r2", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric"):
        score("auc", [1], [1])


def test_program_names_carry_pipeline_colour_and_replica():
    assert deployments.group_name("iris", "green") == "bento-iris-green"
    assert deployments.replica_name("iris", "green", 1) == "bento-iris-green-1"
    assert deployments.Deployment("iris", "3", "flywheel-iris:v3", "blue", (3100, 3101), 0.0).group == "bento-iris-blue"
