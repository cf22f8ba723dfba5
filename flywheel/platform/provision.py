"""Provision: what the services must hold before the platform uses them, set up idempotently at every `up`.

MinIO's buckets, versioning, upload notification and the platform's least-privilege identity;
MLflow's service account and its rights; Airflow's logins (people, the events bridge, the CLI),
each with the least role that does its job.
"""

from __future__ import annotations

import contextlib
import json

import httpx

from flywheel.clients import objectstore
from flywheel.core import pipelines
from flywheel.core.settings import (
    AIRFLOW_USERS,
    INFERENCE_BUCKET,
    ML_ACCESS_KEY,
    MLFLOW_ADMIN_USER,
    MLFLOW_SERVICE_USER,
    RETENTION_ACCESS_KEY,
    Settings,
    write_private,
)
from flywheel.platform.topology import WEBHOOK_IDS

UPLOAD_EVENTS = [
    "s3:ObjectCreated:Put",
    "s3:ObjectCreated:Post",
    "s3:ObjectCreated:Copy",
    "s3:ObjectCreated:CompleteMultipartUpload",
]


class ProvisionError(RuntimeError):
    """A service refused to be set up; the message says which and why."""


def ml_policy(settings: Settings) -> dict:
    """What the platform's MinIO identity may do: read datasets, read and write MLflow's artifacts,
    write and read the inference log (never delete it: its bucket's lifecycle rule does), and add
    training sets derived from feedback (`datasets/<p>/feedback/…`, inference/derive.py) and nothing
    else to the datasets: it cannot replace what a person uploaded."""
    datasets, artifacts, inference = settings.datasets_bucket, settings.mlflow_bucket, INFERENCE_BUCKET
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [f"arn:aws:s3:::{datasets}"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [f"arn:aws:s3:::{datasets}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": [f"arn:aws:s3:::{datasets}/*/feedback/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:*"],
                "Resource": [f"arn:aws:s3:::{artifacts}", f"arn:aws:s3:::{artifacts}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{inference}"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": [f"arn:aws:s3:::{inference}/*"],
            },
        ],
    }


def retention_policy(settings: Settings) -> dict:
    """What the retention job's MinIO identity may do: list the dataset versions and delete old ones."""
    datasets = settings.datasets_bucket
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [f"arn:aws:s3:::{datasets}"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObjectVersion", "s3:DeleteObjectVersion"],
                "Resource": [f"arn:aws:s3:::{datasets}/*"],
            },
            # MinIO checks s3:DeleteObject for a delete by version id too; allowed only with one, so
            # this identity can neither delete an upload nor hide it behind a delete marker.
            {
                "Effect": "Allow",
                "Action": ["s3:DeleteObject"],
                "Resource": [f"arn:aws:s3:::{datasets}/*"],
                "Condition": {"StringLike": {"s3:versionid": ["?*"]}},
            },
        ],
    }


def buckets(settings: Settings) -> None:
    """Buckets, versioning, the webhook notification and the platform's own MinIO identity (with
    only the rights it needs)."""
    from minio import MinioAdmin
    from minio.commonconfig import ENABLED, Filter
    from minio.credentials import StaticProvider
    from minio.error import MinioAdminException
    from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
    from minio.versioningconfig import VersioningConfig

    root = settings.secrets["MINIO_ROOT_USER"], settings.secrets["MINIO_ROOT_PASSWORD"]
    admin = MinioAdmin(endpoint=settings.minio_endpoint, credentials=StaticProvider(*root), secure=False)
    identities = (
        (ML_ACCESS_KEY, "FLYWHEEL_ML_SECRET_KEY", ml_policy(settings)),
        (RETENTION_ACCESS_KEY, "FLYWHEEL_RETENTION_SECRET_KEY", retention_policy(settings)),
    )
    for access_key, secret, policy in identities:
        admin.policy_add(access_key, policy=policy)
        admin.user_add(access_key, settings.secrets[secret])
        with contextlib.suppress(MinioAdminException):  # attached at an earlier `up`
            admin.attach_policy([access_key], user=access_key)
    client = objectstore.client(settings, root=True)
    for bucket in (settings.datasets_bucket, settings.mlflow_bucket, INFERENCE_BUCKET):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    client.set_bucket_versioning(settings.datasets_bucket, VersioningConfig(ENABLED))
    # The inference log's retention: MinIO expires its objects itself.
    days = max(1, round(settings.retention.inference_days))
    expire = Rule(
        ENABLED, rule_filter=Filter(prefix=""), rule_id="flywheel-retention", expiration=Expiration(days=days)
    )
    # ...and a shorter life where a pipeline asks for one (`inference_log.keep_days`): each rule applies,
    # so the shorter wins.
    rules = [expire] + [
        Rule(
            ENABLED,
            rule_filter=Filter(prefix=f"{p.name}/"),
            rule_id=f"flywheel-retention-{p.name}",
            expiration=Expiration(days=p.inference_log.keep_days),
        )
        for p in pipelines.load_all(settings.pipelines_dir)[0]
        if p.inference_log.keep_days and p.inference_log.keep_days < days
    ]
    client.set_bucket_lifecycle(INFERENCE_BUCKET, LifecycleConfig(rules))
    notifications(settings)


def notifications(settings: Settings, targets: tuple[str, ...] = WEBHOOK_IDS) -> None:
    """Uploads to the datasets bucket notify the bridge through MinIO's webhook targets (topology.py).
    bench/upload_to_serving.py leaves out the one that sends at once, to compare."""
    from minio.notificationconfig import NotificationConfig, QueueConfig

    objectstore.client(settings, root=True).set_bucket_notification(
        settings.datasets_bucket,
        NotificationConfig(
            # New objects only: tagging an object (s3:ObjectCreated:PutTagging) is no upload.
            queue_config_list=[
                QueueConfig(queue=f"arn:minio:sqs::{target}:webhook", events=UPLOAD_EVENTS, config_id=target.lower())
                for target in targets
            ]
        ),
    )


def mlflow_accounts(settings: Settings) -> None:
    """MLflow's service account for the platform, with rights on every experiment and model.

    The server's basic-auth app creates the `admin` login (for people) from MLFLOW_AUTH_ADMIN_PASSWORD.
    """
    auth = (MLFLOW_ADMIN_USER, settings.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    with httpx.Client(base_url=settings.mlflow_url, auth=auth, timeout=30) as mlflow:
        user = {"username": MLFLOW_SERVICE_USER, "password": settings.secrets["MLFLOW_TRACKING_PASSWORD"]}
        r = mlflow.post("/api/2.0/mlflow/users/create", json=user)
        if r.status_code >= 300 and "already exists" not in r.text.lower():
            raise ProvisionError(f"MLflow did not create its service account: HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code >= 300:  # keep it in step with .env
            r = mlflow.patch("/api/2.0/mlflow/users/update-password", json=user)
            if r.status_code >= 300:
                raise ProvisionError(f"MLflow kept the service account's old password: HTTP {r.status_code}")
        for resource in ("experiment", "registered_model"):
            grant = {
                "username": MLFLOW_SERVICE_USER,
                "resource_type": resource,
                "resource_id": "*",
                "permission": "MANAGE",
            }
            r = mlflow.post("/api/3.0/mlflow/users/permissions/grant", json=grant)
            if r.status_code >= 300 and "exist" not in r.text.lower():
                raise ProvisionError(
                    f"MLflow refused the service account's rights: HTTP {r.status_code}: {r.text[:200]}"
                )


def airflow_logins(settings: Settings) -> None:
    """The simple auth manager's password file: one login per user of AIRFLOW_USERS (read at start)."""
    passwords = {user.name: settings.secrets[user.secret] for user in AIRFLOW_USERS}
    settings.airflow_passwords.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(settings.airflow_passwords, json.dumps(passwords) + "\n")
