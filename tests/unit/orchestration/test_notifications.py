"""MinIO notifications -> the uploads they report."""

from flywheel.orchestration import notifications


def notification(key: str, name: str = "s3:ObjectCreated:Put", **obj) -> dict:
    return {
        "EventName": name,
        "Key": f"datasets/{key}",
        "Records": [
            {
                "eventName": name,
                "eventTime": "2026-11-23T06:33:09.051Z",
                "s3": {
                    "bucket": {"name": "datasets"},
                    "object": {"key": key, "size": 3858, "eTag": "abc123", "versionId": "v-1", **obj},
                },
            }
        ],
    }


def test_object_created_maps_to_its_pipeline_asset():
    [event] = notifications.uploads(notification("iris/2026/iris.csv"))
    assert event.pipeline == "iris"
    assert event.asset_uri == "s3://datasets/iris"
    assert event.to_dict() == {
        "pipeline": "iris",
        "bucket": "datasets",
        "key": "iris/2026/iris.csv",
        "etag": "abc123",
        "version_id": "v-1",
        "size": 3858,
        "event_time": "2026-11-23T06:33:09.051Z",
    }


def test_url_encoded_keys_are_decoded():
    [event] = notifications.uploads(notification("iris/my+data%281%29.csv"))
    assert event.key == "iris/my data(1).csv"


def test_records_without_a_dataset_are_dropped():
    assert notifications.uploads(notification("iris/")) == []
    assert notifications.uploads(notification("iris/x.csv", name="s3:ObjectRemoved:Delete")) == []
    assert notifications.uploads({}) == []


def test_unversioned_object_has_empty_version_id():
    [event] = notifications.uploads(notification("iris/x.csv", versionId=None))
    assert event.version_id == ""


def test_a_key_outside_any_pipeline_folder_is_kept_for_the_dead_letters():
    [event] = notifications.uploads(notification("root.csv"))
    assert event.pipeline == ""
    assert event.key == "root.csv"
