"""Data: read the exact uploaded object version from MinIO into a table."""

from __future__ import annotations

import io
from dataclasses import dataclass

from minio import Minio

from flywheel.settings import Settings


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
        return {"uri": self.uri, "bucket": self.bucket, "key": self.key, "etag": self.etag, "version_id": self.version_id}


def minio_client(settings: Settings) -> Minio:
    return Minio(
        settings.minio_endpoint,
        access_key=settings.secrets["MINIO_ROOT_USER"],
        secret_key=settings.secrets["MINIO_ROOT_PASSWORD"],
        secure=False,
    )


def fetch(settings: Settings, ref: DatasetRef) -> bytes:
    response = minio_client(settings).get_object(ref.bucket, ref.key, version_id=ref.version_id or None)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def read_table(raw: bytes, fmt: str):
    import pandas as pd

    if fmt == "csv":
        return pd.read_csv(io.BytesIO(raw))
    raise ValueError(f"unsupported format {fmt!r}")
