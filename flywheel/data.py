"""Data: read the exact uploaded object version from MinIO into a table."""

from __future__ import annotations

from dataclasses import dataclass

from minio import Minio

from flywheel.settings import ML_ACCESS_KEY, Settings


@dataclass(frozen=True)
class DatasetRef:
    """The object version a run trains on: what the dataset asset event carried."""

    bucket: str
    key: str
    etag: str = ""
    version_id: str = ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def describe(self) -> str:
        version = f" (version {self.version_id})" if self.version_id else ""
        return f"{self.uri}{version}"

    @classmethod
    def from_extra(cls, extra: dict) -> DatasetRef:
        return cls(extra["bucket"], extra["key"], extra.get("etag", ""), extra.get("version_id", ""))

    def as_dict(self) -> dict:
        return {
            "uri": self.uri,
            "bucket": self.bucket,
            "key": self.key,
            "etag": self.etag,
            "version_id": self.version_id,
        }


def minio_client(settings: Settings, root: bool = False) -> Minio:
    """The platform's MinIO identity (read datasets, read and write mlflow), or, to set MinIO up and
    for a person uploading datasets, the root user."""
    if root:
        access_key, secret_key = settings.secrets["MINIO_ROOT_USER"], settings.secrets["MINIO_ROOT_PASSWORD"]
    else:
        access_key, secret_key = ML_ACCESS_KEY, settings.secrets["FLYWHEEL_ML_SECRET_KEY"]
    return Minio(settings.minio_endpoint, access_key=access_key, secret_key=secret_key, secure=False)


def fetch(settings: Settings, ref: DatasetRef) -> bytes:
    response = minio_client(settings).get_object(ref.bucket, ref.key, version_id=ref.version_id or None)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def size_of(settings: Settings, ref: DatasetRef) -> int:
    return minio_client(settings).stat_object(ref.bucket, ref.key, version_id=ref.version_id or None).size


def idx_parts(settings: Settings, marker: DatasetRef) -> dict[str, DatasetRef]:
    """The images and labels objects of an IDX set, found beside its `_SUCCESS` marker.

    The marker is uploaded last. If it holds JSON ({"images": etag, "labels": etag}), the parts
    must have exactly those etags, so a set re-uploaded half-way is never paired with a stale half.
    """
    import json

    from flywheel.errors import DatasetInvalid
    from flywheel.pipelines import IDX_PARTS

    folder = marker.key.rsplit("/", 1)[0] + "/"
    client = minio_client(settings)
    found: dict[str, list] = {name: [] for name in IDX_PARTS}
    for obj in client.list_objects(marker.bucket, prefix=folder):
        base = obj.object_name.rsplit("/", 1)[-1]
        for name in IDX_PARTS:
            if name in base.lower():
                found[name].append(obj)
    where = f"{marker.describe()}"
    for name, objs in found.items():
        if len(objs) != 1:
            raise DatasetInvalid(
                f"{where}: the set {folder} needs exactly one object named *{name}*, "
                f"found {len(objs)} (rule: consistent pair)"
            )
    manifest_raw = fetch(settings, marker).strip()
    manifest = {}
    if manifest_raw:
        try:
            manifest = json.loads(manifest_raw)
        except ValueError as exc:
            raise DatasetInvalid(f"{where}: the marker is neither empty nor JSON (rule: consistent pair)") from exc
    parts = {}
    for name, [obj] in found.items():
        etag = (obj.etag or "").strip('"')
        if manifest.get(name) and manifest[name].strip('"') != etag:
            raise DatasetInvalid(
                f"{where}: {obj.object_name} has etag {etag}, the marker expects "
                f"{manifest[name]} (rule: consistent pair)"
            )
        stat = client.stat_object(marker.bucket, obj.object_name)
        parts[name] = DatasetRef(marker.bucket, obj.object_name, etag, stat.version_id or "")
    return parts
