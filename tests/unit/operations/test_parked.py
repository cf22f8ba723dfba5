"""Parked uploads: one private file per upload (and reason, for dead letters), counted, removable."""

from flywheel.core.settings import Settings
from flywheel.operations.parked import DEAD_LETTERS, HELD


def test_a_dead_letter_is_kept_once_privately_and_counted(tmp_path):
    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path)})
    upload = {"key": "stray.csv", "version_id": "v1", "etag": "e"}
    first = DEAD_LETTERS.write(settings, "no pipeline owns the root of datasets/", upload, {"Records": []})
    DEAD_LETTERS.write(settings, "no pipeline owns the root of datasets/", upload)  # MinIO delivered it twice
    DEAD_LETTERS.write(settings, "no pipeline owns the root of datasets/", {**upload, "version_id": "v2"})
    assert DEAD_LETTERS.count(settings) == 2
    assert first.stat().st_mode & 0o777 == 0o600
    assert DEAD_LETTERS.folder(settings).stat().st_mode & 0o777 == 0o700
    [letter, _] = DEAD_LETTERS.read_all(settings)
    assert letter["reason"].startswith("no pipeline owns") and letter["upload"]["key"] == "stray.csv"
    assert DEAD_LETTERS.remove(settings, letter["id"]) and DEAD_LETTERS.count(settings) == 1


def test_an_upload_is_held_once_whatever_the_reason(tmp_path):
    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path)})
    upload = {"key": "apple/x.csv", "version_id": "v1", "etag": "e"}
    HELD.write(settings, "apple.yaml does not load", upload)
    HELD.write(settings, "train_apple is not parsed yet", upload)
    assert HELD.count(settings) == 1 and DEAD_LETTERS.count(settings) == 0
