"""Datasets: read the exact uploaded object version and check it against its pipeline's rules.

Tables (CSV, Parquet) are checked here; images (NPZ, IDX) in images.py. A broken rule raises
DatasetInvalid naming the object, its version and the rule: the step that meets it is `rejected`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from flywheel.clients import objectstore
from flywheel.core.errors import DatasetInvalid
from flywheel.core.pipelines import IDX_PARTS, Pipeline
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload


@dataclass
class Dataset:
    """A validated upload: features `x` and labels `y`, as arrays (tables keep their frame too)."""

    x: Any
    y: Any
    table: Any = None

    def __len__(self) -> int:
        return len(self.y)


def _fail(where: str, problem: str, rule: str) -> DatasetInvalid:
    return DatasetInvalid(f"{where}: {problem} (rule: {rule})")


def read_table(raw: bytes, fmt: str, where: str):
    import pandas as pd

    if not raw.strip():
        raise _fail(where, "the object is empty", "readable format")
    try:
        if fmt == "csv":
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise _fail(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})", "encoding") from exc
            return pd.read_csv(io.StringIO(text))
        return pd.read_parquet(io.BytesIO(raw))
    except DatasetInvalid:
        raise
    except Exception as exc:  # any parser error is the upload's fault, reported as such
        raise _fail(where, f"cannot be read as {fmt.upper()}: {exc}", "readable format") from exc


def check_labels(pipeline: Pipeline, labels: list[str], where: str) -> None:
    """Label values (declared classes), at least two classes, and the class balance floor."""
    from collections import Counter

    counts = Counter(labels)
    if pipeline.classes:
        unknown = sorted(set(counts) - set(pipeline.classes))
        if unknown:
            raise _fail(
                where,
                f"label value(s) {unknown[:5]} not among the declared classes {list(pipeline.classes)}",
                "label values",
            )
    if len(counts) < 2:
        raise _fail(where, f"only {len(counts)} distinct label value(s); a classifier needs at least 2", "label values")
    rarest, n = min(counts.items(), key=lambda kv: kv[1])
    floor = pipeline.validation.min_class_fraction
    if n / len(labels) < floor:
        raise _fail(where, f"class {rarest!r} is {n / len(labels):.1%} of rows, below {floor:.1%}", "class balance")


def check_table(pipeline: Pipeline, table, where: str) -> None:
    """Raise DatasetInvalid on the first broken rule."""
    import numpy as np
    import pandas as pd

    rules = pipeline.validation
    missing = [c for c in (*pipeline.features, pipeline.target) if c not in table.columns]
    if missing:
        raise _fail(where, f"missing column(s) {', '.join(missing)}", "required columns")
    if len(table) < rules.min_rows:
        raise _fail(where, f"{len(table)} rows, need at least {rules.min_rows}", "minimum rows")
    columns = [*pipeline.features, pipeline.target]
    rates = table[columns].isna().mean()
    worst = rates.idxmax()
    if rates[worst] > rules.max_missing_rate:
        raise _fail(
            where,
            f"column {worst!r} is {rates[worst]:.1%} missing, above {rules.max_missing_rate:.1%}",
            "missing values",
        )
    for column in pipeline.features:
        if not pd.api.types.is_numeric_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column]):
            raise _fail(where, f"feature column {column!r} is {table[column].dtype}, not numeric", "column types")
        if np.isinf(table[column]).any():
            raise _fail(where, f"feature column {column!r} holds infinite values", "column types")
    target = table[pipeline.target].dropna()
    if pipeline.task == "regression":
        if not pd.api.types.is_numeric_dtype(target):
            raise _fail(where, f"target {pipeline.target!r} is {target.dtype}, not numeric", "column types")
    else:
        check_labels(pipeline, [str(v) for v in target], where)


def _fetch_checked(settings: Settings, pipeline: Pipeline, upload: Upload) -> bytes:
    size = objectstore.size_of(settings, upload)
    if size > pipeline.validation.max_bytes:
        raise _fail(
            upload.describe(), f"{size} bytes, above the limit of {pipeline.validation.max_bytes}", "maximum size"
        )
    return objectstore.fetch(settings, upload)


def load(settings: Settings, pipeline: Pipeline, upload: Upload) -> Dataset:
    """The upload as arrays, or DatasetInvalid naming the object, its version and the rule."""
    where = upload.describe()
    if not pipeline.is_image:
        table = read_table(_fetch_checked(settings, pipeline, upload), pipeline.format, where)
        check_table(pipeline, table, where)
        x = table[list(pipeline.features)].to_numpy(dtype="float32")
        return Dataset(x=x, y=table[pipeline.target].to_numpy(), table=table)

    from flywheel.training import images

    if pipeline.format == "idx":
        part_refs = idx_parts(settings, upload)
        parts = {name: _fetch_checked(settings, pipeline, r) for name, r in part_refs.items()}
        where = f"{where} -> {', '.join(r.describe() for r in part_refs.values())}"
    else:
        parts = {"data": _fetch_checked(settings, pipeline, upload)}
    x, y = images.read_images(pipeline.format, parts, where)
    classes = [int(c) for c in pipeline.classes] if pipeline.classes else None
    images.check_images(
        x,
        y,
        shape=pipeline.image_shape,
        max_value=pipeline.max_value,
        classes=classes,
        min_rows=pipeline.validation.min_rows,
        min_class_fraction=pipeline.validation.min_class_fraction,
        where=where,
    )
    return Dataset(x=x.astype("float32"), y=y)


def idx_parts(settings: Settings, marker: Upload) -> dict[str, Upload]:
    """The images and labels objects of an IDX set, found beside its `_SUCCESS` marker.

    The marker is uploaded last. If it holds JSON ({"images": etag, "labels": etag}), the parts
    must have exactly those etags, so a set re-uploaded half-way is never paired with a stale half.
    """
    folder = marker.key.rsplit("/", 1)[0] + "/"
    client = objectstore.client(settings)
    found: dict[str, list] = {name: [] for name in IDX_PARTS}
    for obj in client.list_objects(marker.bucket, prefix=folder):
        base = obj.object_name.rsplit("/", 1)[-1]
        for name in IDX_PARTS:
            if name in base.lower():
                found[name].append(obj)
    where = marker.describe()
    for name, objs in found.items():
        if len(objs) != 1:
            raise DatasetInvalid(
                f"{where}: the set {folder} needs exactly one object named *{name}*, "
                f"found {len(objs)} (rule: consistent pair)"
            )
    manifest_raw = objectstore.fetch(settings, marker).strip()
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
        parts[name] = marker.part(obj.object_name, etag, stat.version_id or "")
    return parts
