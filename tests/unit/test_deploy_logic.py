"""Deploy's pure parts: replaying the holdout score, colours and ports."""

import pytest

from flywheel import deploy


def test_replay_accuracy_compares_labels_as_text():
    assert deploy.replay_score("accuracy", ["3", "1", "2"], [3, 1, 0]) == pytest.approx(2 / 3)


def test_replay_regression_metrics():
    assert deploy.replay_score("rmse", [1.0, 3.0], [2.0, 2.0]) == pytest.approx(1.0)
    assert deploy.replay_score("mae", [1.0, 4.0], [2.0, 2.0]) == pytest.approx(1.5)
    assert deploy.replay_score("r2", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_program_names_carry_pipeline_and_colour():
    assert deploy.program_name("iris", "green") == "bento-iris-green"
