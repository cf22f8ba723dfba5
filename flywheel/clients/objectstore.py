"""Object store: MinIO through its S3 API, as the platform's identity or (to set up, or as a person) root."""

from __future__ import annotations

from minio import Minio

from flywheel.core.settings import ML_ACCESS_KEY, RETENTION_ACCESS_KEY, Settings
from flywheel.core.upload import Upload


def client(settings: Settings, root: bool = False) -> Minio:
    """The platform's MinIO identity (read datasets, read and write mlflow), or, to set MinIO up and
    for a person uploading datasets, the root user."""
    if root:
        access_key, secret_key = settings.secrets["MINIO_ROOT_USER"], settings.secrets["MINIO_ROOT_PASSWORD"]
    else:
        access_key, secret_key = ML_ACCESS_KEY, settings.secrets["FLYWHEEL_ML_SECRET_KEY"]
    return Minio(settings.minio_endpoint, access_key=access_key, secret_key=secret_key, secure=False)


def retention_client(settings: Settings) -> Minio:
    """The retention job's identity: it lists dataset versions and deletes old ones, nothing else."""
    secret = settings.secrets["FLYWHEEL_RETENTION_SECRET_KEY"]
    return Minio(settings.minio_endpoint, access_key=RETENTION_ACCESS_KEY, secret_key=secret, secure=False)


def fetch(settings: Settings, upload: Upload) -> bytes:
    """The exact object version the upload names."""
    response = client(settings).get_object(upload.bucket, upload.key, version_id=upload.version_id or None)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def size_of(settings: Settings, upload: Upload) -> int:
    return client(settings).stat_object(upload.bucket, upload.key, version_id=upload.version_id or None).size
