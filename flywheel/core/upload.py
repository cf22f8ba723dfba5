"""Upload: one uploaded object version, the one type it has from MinIO's notification to the answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# What an answer says of the dataset that trained its model (body "dataset", header X-Dataset-Version).
ANSWER_FIELDS = ("uri", "key", "etag", "version_id")


@dataclass(frozen=True)
class Upload:
    """An object version under `datasets/<pipeline>/`.

    It travels as the extra of an `s3://datasets/<pipeline>` asset event, as a step's argument, as a
    training run's and a model version's tags (core/schema.py), and into every Bento, which echoes it
    in each answer.
    """

    pipeline: str
    bucket: str
    key: str
    etag: str = ""
    version_id: str = ""
    size: int = 0
    event_time: str = ""  # when MinIO stored it (ISO 8601)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def asset_uri(self) -> str:
        """The dataset asset its event goes to: `s3://datasets/<pipeline>`."""
        return f"s3://{self.bucket}/{self.pipeline}"

    def describe(self) -> str:
        version = f" (version {self.version_id})" if self.version_id else ""
        return f"{self.uri}{version}"

    def same_as(self, other: Upload) -> bool:
        """The same object version: by version id where both have one, else by key and etag."""
        if self.version_id and other.version_id:
            return self.version_id == other.version_id
        return (self.key, self.etag) == (other.key, other.etag)

    def part(self, key: str, etag: str = "", version_id: str = "") -> Upload:
        """Another object of the same set (an IDX set's images or labels beside its marker)."""
        return Upload(self.pipeline, self.bucket, key, etag, version_id)

    def to_dict(self) -> dict:
        """The asset event's extra, a step's argument: plain JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Upload:
        """From an asset event's extra or a step argument; fields it does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["etag"] = str(values.get("etag") or "").strip('"')
        values["version_id"] = str(values.get("version_id") or "")
        values["size"] = int(values.get("size") or 0)
        return cls(**values)

    def answer(self) -> dict:
        """What a Bento says of it in each answer."""
        return {"uri": self.uri, "key": self.key, "etag": self.etag, "version_id": self.version_id}


def pipeline_of(key: str) -> str:
    """`iris/2026/x.csv` belongs to pipeline `iris`; a key at the bucket root belongs to none ("")."""
    head, sep, rest = key.partition("/")
    return head if sep and head and rest else ""
