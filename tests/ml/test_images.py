"""Image datasets: NPZ and IDX files round-trip, and every broken rule is rejected by name."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from flywheel.core.errors import DatasetInvalid
from flywheel.training.images import check_images, read_images, write_idx, write_npz

WHERE = "s3://datasets/digits/upload.npz (version v-1)"
RULES = dict(shape=(8, 8), max_value=16.0, classes=list(range(10)), min_rows=20, min_class_fraction=0.05)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def _check(x, y, **overrides):
    check_images(x, y, **{**RULES, **overrides}, where=WHERE)


def _rejects(rule: str, call, *args, **kwargs) -> str:
    with pytest.raises(DatasetInvalid) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert f"(rule: {rule})" in message, message
    assert message.startswith(WHERE), message
    return message


# ---- readers round-trip -----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(digits, compress):
    x, y = digits
    images, labels = write_idx(x, y)
    assert int.from_bytes(images[:4], "big") == 0x00000803
    assert int.from_bytes(labels[:4], "big") == 0x00000801
    assert images[4:16] == np.array([len(x), 8, 8], dtype=">u4").tobytes()
    if compress:
        images, labels = gzip.compress(images), gzip.compress(labels)
    got_x, got_y = read_images("idx", {"images": images, "labels": labels}, WHERE)
    assert got_x.shape == (1797, 8, 8) and got_y.shape == (1797,)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    _check(got_x, got_y)


def test_idx_keeps_float_values():
    x = np.linspace(0, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    images, labels = write_idx(x, np.array([0, 1]))
    got_x, _ = read_images("idx", {"images": images, "labels": labels}, WHERE)
    assert got_x.dtype == np.float32
    np.testing.assert_array_equal(got_x, x)


def test_npz_round_trip(digits):
    x, y = digits
    got_x, got_y = read_images("npz", {"data": write_npz(x, y)}, WHERE)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert got_y.dtype.kind == "i"


def test_npz_with_mnist_names_and_a_channel_axis(digits, tmp_path):
    x, y = digits
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x[..., None], y_train=y.astype(np.uint8), x_test=x[:5], y_test=y[:5])
    got_x, got_y = read_images("npz", {"data": path.read_bytes()}, WHERE)
    assert got_x.shape == (1797, 8, 8)
    np.testing.assert_array_equal(got_y, y)


# ---- unreadable files ---------------------------------------------------------------------------


def test_idx_bad_magic(digits):
    images, labels = write_idx(*digits)
    message = _rejects("readable format", read_images, "idx", {"images": labels, "labels": labels}, WHERE)
    assert "0x00000801" in message and "0x00000803" in message
    _rejects("readable format", read_images, "idx", {"images": b"%PNG\r\n\x1a\n" + images[8:], "labels": labels}, WHERE)


def test_idx_truncated(digits):
    images, labels = write_idx(*digits)
    message = _rejects("readable format", read_images, "idx", {"images": images[:-100], "labels": labels}, WHERE)
    assert "truncated" in message
    _rejects("readable format", read_images, "idx", {"images": images[:10], "labels": labels}, WHERE)
    broken_gzip = gzip.compress(images)[:-50]
    _rejects("readable format", read_images, "idx", {"images": broken_gzip, "labels": labels}, WHERE)


def test_idx_count_mismatch(digits):
    x, y = digits
    images, _ = write_idx(x, y)
    _, labels = write_idx(x[:10], y[:-1])
    message = _rejects("consistent pair", read_images, "idx", {"images": images, "labels": labels}, WHERE)
    assert "1797 images but 1796 labels" in message


def test_npz_without_the_arrays(digits):
    x, y = digits
    import io

    buffer = io.BytesIO()
    np.savez(buffer, images=x, labels=y)
    message = _rejects("readable format", read_images, "npz", {"data": buffer.getvalue()}, WHERE)
    assert "['images', 'labels']" in message
    _rejects("readable format", read_images, "npz", {"data": b"x,y\n1,2\n"}, WHERE)
    _rejects("readable format", read_images, "npz", {"data": write_npz(x, y)[:-200]}, WHERE)


def test_npz_count_mismatch(digits):
    x, y = digits
    _rejects("consistent pair", read_images, "npz", {"data": write_npz(x, y[:-3])}, WHERE)


def test_npz_non_numeric_labels(digits):
    x, _ = digits
    _rejects("readable format", read_images, "npz", {"data": write_npz(x, np.array(["a"] * len(x)))}, WHERE)


# ---- rules --------------------------------------------------------------------------------------


def test_wrong_image_shape(digits):
    x, y = digits
    message = _rejects("image shape", _check, x[:, :7, :], y)
    assert "(7, 8)" in message and "8x8" in message
    _rejects("image shape", _check, x.reshape(len(x), 64), y)


@pytest.mark.parametrize(
    "value,reason",
    [(17, "outside [0, 16]"), (-1, "outside [0, 16]"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")],
    ids=["above max", "negative", "nan", "inf"],
)
def test_value_out_of_range(digits, value, reason):
    x, y = digits
    x = x.astype(np.float32)
    x[42, 3, 3] = value
    message = _rejects("value range", _check, x, y)
    assert reason in message and "index 42" in message


def test_unknown_label(digits):
    x, y = digits
    y = y.copy()
    y[7] = 11
    message = _rejects("label values", _check, x, y)
    assert "[11]" in message


def test_single_class(digits):
    x, y = digits
    _rejects("class balance", _check, x, np.full_like(y, 3), classes=None)


def test_class_imbalance(digits):
    x, y = digits
    keep = (y != 9) | (np.cumsum(y == 9) <= 20)  # 20 nines of ~1,620 images: 1.2%
    message = _rejects("class balance", _check, x[keep], y[keep])
    assert "class 9 has 20 of" in message
    # A declared class with no images at all is the rarest.
    rare = _rejects("class balance", _check, x[y != 4], y[y != 4])
    assert "class 4 has 0 of" in rare


def test_too_few_rows(digits):
    x, y = digits
    message = _rejects("minimum rows", _check, x[:19], y[:19])
    assert "19 images, need at least 20" in message


def test_valid_data_passes(digits):
    _check(*digits)
    _check(*digits, classes=None)
