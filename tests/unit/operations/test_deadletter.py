"""Dead letters: one private file per upload and reason, counted."""

from flywheel.core.settings import Settings
from flywheel.operations import deadletter


def test_a_dead_letter_is_kept_once_privately_and_counted(tmp_path):
    settings = Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path)})
    upload = {"key": "stray.csv", "version_id": "v1", "etag": "e"}
    first = deadletter.write(settings, "no pipeline owns the root of datasets/", upload, {"Records": []})
    deadletter.write(settings, "no pipeline owns the root of datasets/", upload)  # MinIO delivered it twice
    deadletter.write(settings, "no pipeline owns the root of datasets/", {**upload, "version_id": "v2"})
    assert deadletter.count(settings) == 2
    assert first.stat().st_mode & 0o777 == 0o600
    assert deadletter.folder(settings).stat().st_mode & 0o777 == 0o700
    [letter, _] = deadletter.read_all(settings)
    assert letter["reason"].startswith("no pipeline owns") and letter["upload"]["key"] == "stray.csv"
