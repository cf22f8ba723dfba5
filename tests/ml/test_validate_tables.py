"""Table validation: each rule, exercised with a real bad file in the pipeline's own format."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from flywheel.core import pipelines
from flywheel.core.errors import DatasetInvalid
from flywheel.core.settings import REPO_ROOT
from flywheel.training import samples
from flywheel.training.datasets import check_table, read_table

IRIS = pipelines.get(REPO_ROOT / "pipelines", "iris")
DIABETES = pipelines.get(REPO_ROOT / "pipelines", "diabetes")
WHERE = "s3://datasets/iris/bad.csv (version v-1)"


def iris_csv(transform=lambda t: t) -> bytes:
    return transform(samples.iris()).to_csv(index=False).encode()


def validate_csv(raw: bytes, pipeline=IRIS):
    check_table(pipeline, read_table(raw, pipeline.format, WHERE), WHERE)


def test_shipped_samples_pass():
    validate_csv(iris_csv())
    validate_csv(samples.wine().to_csv(index=False).encode(), pipelines.get(REPO_ROOT / "pipelines", "wine"))
    buffer = io.BytesIO()
    samples.diabetes().to_parquet(buffer)
    check_table(DIABETES, read_table(buffer.getvalue(), "parquet", WHERE), WHERE)


def _drop_target(t):
    return t.drop(columns=["species"])


def _few_rows(t):
    return t.head(5)


def _text_feature(t):
    return t.assign(sepal_length=["wide"] * len(t))


def _missing(t):
    return t.assign(petal_width=t.petal_width.where(t.index % 10 != 0))


def _unknown_label(t):
    return t.assign(species=t.species.replace("setosa", "rose"))


def _single_class(t):
    return t.assign(species="setosa")


def _imbalanced(t):
    return pd.concat([t[t.species != "virginica"], t[t.species == "virginica"].head(3)])


def _infinite(t):
    return t.assign(sepal_width=t.sepal_width.replace(t.sepal_width.iloc[0], np.inf))


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (b"", "readable format"),
        (b'sepal_length,species\n1,"unclosed\n', "readable format"),
        ("sepal_length,species\n5.1,sétosa\n".encode("latin-1"), "encoding"),
        (iris_csv(_drop_target), "required columns"),
        (iris_csv(_few_rows), "minimum rows"),
        (iris_csv(_text_feature), "column types"),
        (iris_csv(_infinite), "column types"),
        (iris_csv(_missing), "missing values"),
        (iris_csv(_unknown_label), "label values"),
        (iris_csv(_single_class), "label values"),
        (iris_csv(_imbalanced), "class balance"),
    ],
    ids=[
        "empty",
        "unparseable",
        "not-utf8",
        "no-target",
        "few-rows",
        "text-feature",
        "infinite",
        "missing",
        "unknown-label",
        "single-class",
        "imbalanced",
    ],
)
def test_each_rule_names_object_and_rule(raw, rule):
    with pytest.raises(DatasetInvalid) as err:
        validate_csv(raw)
    assert str(err.value).startswith(WHERE)
    assert f"(rule: {rule})" in str(err.value)


def test_parquet_that_is_not_parquet():
    with pytest.raises(DatasetInvalid, match=r"cannot be read as PARQUET.*rule: readable format"):
        read_table(b"PAR1 not really", "parquet", WHERE)


def test_regression_target_must_be_numeric():
    table = samples.diabetes().assign(progression="high")
    with pytest.raises(DatasetInvalid, match=r"target 'progression'.*not numeric"):
        check_table(DIABETES, table, WHERE)


def test_missing_rate_under_the_limit_passes():
    table = samples.diabetes()
    table.loc[0, "bmi"] = np.nan  # 1 of 442 rows: 0.2%, the pipeline allows 1%
    check_table(DIABETES, table, WHERE)
