"""Pipeline files: the shipped ones load; mistakes name the file and the field."""

from pathlib import Path

import pytest

from flywheel import pipelines
from flywheel.settings import REPO_ROOT

GOOD = """
name: demo
format: csv
task: classification
target: y
features: [a, b]
framework: xgboost
metric: accuracy
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_pipelines_load():
    loaded, errors = pipelines.load_all(REPO_ROOT / "pipelines")
    assert errors == []
    iris = next(p for p in loaded if p.name == "iris")
    assert iris.dataset_uri == "s3://datasets/iris"
    assert iris.model_uri == "model://iris/production"
    assert len(iris.features) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("target: y\n", ""), "missing required field 'target'"),
        (GOOD.replace("task: classification", "task: clustering"), "field 'task' is 'clustering'"),
        (GOOD.replace("features: [a, b]", "features: []"), "field 'features'"),
        (GOOD.replace("framework: xgboost", "framework: sklearn"), "field 'framework'"),
        (GOOD + "holdout: {fraction: 1.5}\n", "holdout.fraction"),
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "expected a mapping"),
    ],
)
def test_mistakes_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, "demo", text)
    with pytest.raises(pipelines.PipelineError) as err:
        pipelines.load(path)
    assert "demo.yaml" in str(err.value)
    assert message in str(err.value)


def test_name_must_match_file(tmp_path):
    with pytest.raises(pipelines.PipelineError, match="file is named 'other'"):
        pipelines.load(write(tmp_path, "other", GOOD))


def test_a_broken_file_does_not_hide_the_others(tmp_path):
    write(tmp_path, "demo", GOOD)
    write(tmp_path, "broken", "name: broken\n")
    loaded, errors = pipelines.load_all(tmp_path)
    assert [p.name for p in loaded] == ["demo"]
    assert len(errors) == 1 and "broken.yaml" in str(errors[0])


def test_index_gives_each_pipeline_its_own_ports(tmp_path):
    write(tmp_path, "demo", GOOD)
    write(tmp_path, "alpha", GOOD.replace("demo", "alpha"))
    assert pipelines.index_of(tmp_path, "alpha") == 0
    assert pipelines.index_of(tmp_path, "demo") == 1
