"""CLI parsing."""

from pathlib import Path

import pytest

from flywheel.cli import build_parser


def test_upload_defaults_to_iris():
    args = build_parser().parse_args(["upload", "data.csv"])
    assert args.file == Path("data.csv") and args.pipeline == "iris" and args.key is None


def test_predict_takes_rows_and_pipeline():
    args = build_parser().parse_args(["predict", "[[1, 2, 3, 4]]", "--pipeline", "iris"])
    assert args.rows == "[[1, 2, 3, 4]]" and args.pipeline == "iris"


@pytest.mark.parametrize("verb", ["up", "down", "status", "demo"])
def test_verbs(verb):
    assert build_parser().parse_args([verb]).command == verb


def test_unknown_verb_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch"])
