"""Drift against a training profile, with the real tests (scipy) on real data (scikit-learn's sets).

The oracle is what each test did to the data: windows drawn from the training rows must not alarm,
a window with one feature moved must name exactly that feature.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits, load_iris

from flywheel.core import profiles
from flywheel.core.pipelines import Monitor
from flywheel.inference import drift

IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_profile():
    data = load_iris()
    names = np.array(data.target_names)[data.target]
    return data.data, names, profiles.build(IRIS, data.data, names, "classification")


def window(x, predictions, rows, rng, shift=None):
    picked = rng.integers(0, len(x), rows)
    moved = x[picked].copy()
    if shift is not None:
        column, by = shift
        moved[:, column] += by
    columns = {name: moved[:, i].tolist() for i, name in enumerate(IRIS)}
    columns[profiles.PREDICTION] = predictions[picked].tolist()
    return columns


def test_windows_from_the_training_distribution_raise_no_alarm():
    x, y, profile = iris_profile()
    rng = np.random.default_rng(1)
    alarms = [drift.compare(profile, window(x, y, 300, rng), Monitor()).detected for _ in range(100)]
    assert sum(alarms) == 0


def test_one_shifted_feature_is_detected_and_named():
    x, y, profile = iris_profile()
    rng = np.random.default_rng(2)
    shift = 1.5 * x[:, 1].std()  # sepal_width, by a clear one and a half standard deviations
    result = drift.compare(profile, window(x, y, 300, rng, shift=(1, shift)), Monitor())
    assert result.decided and result.detected
    assert result.drifted == ["sepal_width"], result.reason
    assert "sepal_width" in result.reason


def test_a_changed_class_mix_in_the_answers_is_detected():
    x, y, profile = iris_profile()
    rng = np.random.default_rng(3)
    columns = window(x, y, 300, rng)
    columns[profiles.PREDICTION] = ["setosa"] * 300  # the model answers one class only
    result = drift.compare(profile, columns, Monitor())
    assert profiles.PREDICTION in result.drifted


def test_a_window_with_too_few_answers_says_so_and_decides_nothing():
    x, y, profile = iris_profile()
    result = drift.compare(profile, window(x, y, 20, np.random.default_rng(4), shift=(0, 10.0)), Monitor())
    assert not result.decided and not result.detected
    assert "20 answers" in result.reason and "100" in result.reason


def test_inverted_digits_move_the_image_summaries():
    digits = load_digits()
    images = digits.images  # 8x8, 0..16
    predictions = [str(v) for v in digits.target]
    profile = profiles.build(
        list(profiles.IMAGE_FEATURES), profiles.image_summary(images, 16), predictions, "classification"
    )
    rng = np.random.default_rng(5)
    picked = rng.integers(0, len(images), 300)
    same = profiles.image_summary(images[picked], 16)
    inverted = profiles.image_summary(16 - images[picked], 16)
    columns = {name: same[:, i].tolist() for i, name in enumerate(profiles.IMAGE_FEATURES)}
    columns[profiles.PREDICTION] = [predictions[i] for i in picked]
    assert not drift.compare(profile, columns, Monitor()).detected
    columns.update({name: inverted[:, i].tolist() for i, name in enumerate(profiles.IMAGE_FEATURES)})
    result = drift.compare(profile, columns, Monitor())
    assert result.detected and "pixel_mean" in result.drifted


def test_the_report_draws_every_feature():
    x, y, profile = iris_profile()
    columns = window(x, y, 200, np.random.default_rng(6), shift=(2, 3.0))
    result = drift.compare(profile, columns, Monitor())
    page = drift.report("iris v1", profile, columns, result)
    assert page.startswith("<!doctype html>")
    assert page.count("<img") == len(IRIS) + 1
    for name in IRIS:
        assert f">{name}<" in page
    assert "petal_length" in result.drifted


def test_mnist_format_images_shifted_off_centre_or_inverted_are_detected():
    from flywheel.training import samples

    images, labels = samples.mnist(seed=0)  # 28x28, 0..255, digits centred as MNIST centres them
    predictions = [str(v) for v in labels]
    train, live = images[:1200], images[1200:1500]
    profile = profiles.build(
        list(profiles.IMAGE_FEATURES), profiles.image_summary(train, 255), predictions[:1200], "classification"
    )

    def columns(batch):
        summary = profiles.image_summary(batch, 255)
        found = {name: summary[:, i].tolist() for i, name in enumerate(profiles.IMAGE_FEATURES)}
        found[profiles.PREDICTION] = predictions[1200:1500]
        return found

    assert not drift.compare(profile, columns(live), Monitor()).detected
    inverted = drift.compare(profile, columns(255 - live), Monitor())
    assert inverted.detected and "pixel_mean" in inverted.drifted
    # Half the digit pushed out of the frame: less ink in every image.
    cropped = np.roll(live, 14, axis=2)
    cropped[:, :, :14] = 0
    shifted = drift.compare(profile, columns(cropped), Monitor())
    assert shifted.detected and "ink_fraction" in shifted.drifted, shifted.reason


def test_values_at_full_precision_are_not_drift():
    """Diabetes' features are standardised floats and one is binary: live values arrive at float64
    precision, the profile keeps float32. Compared at one precision, windows of the training rows
    raise no alarm (rounding once split every tie of the binary feature: half the mass 'drifted')."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    names = [f"f{i}" for i in range(data.data.shape[1])]
    profile = profiles.build(names, data.data.astype(np.float32), data.target, "regression")
    rng = np.random.default_rng(7)
    for _ in range(20):
        picked = rng.integers(0, len(data.data), 300)
        columns = {n: data.data[picked, i].tolist() for i, n in enumerate(names)}
        columns[profiles.PREDICTION] = data.target[picked].tolist()
        result = drift.compare(profile, columns, Monitor())
        assert not result.detected, result.reason
