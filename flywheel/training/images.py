"""Images: read NPZ and IDX image datasets into arrays, and check them against a pipeline's rules."""

from __future__ import annotations

import gzip
import io
import zipfile

import numpy as np

from flywheel.core.errors import DatasetInvalid

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
# IDX type codes (the third magic byte) and their big-endian dtypes; MNIST itself uses 0x08.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with members, an empty one
# A gzip member that inflates past this is refused rather than filling the worker's memory.
MAX_INFLATED_BYTES = 2 * 1024**3
# Array names in an NPZ upload: ours first, then the names MNIST's own mnist.npz uses.
NPZ_KEYS = (("x", "y"), ("x_train", "y_train"))


def _inflate(raw: bytes, what: str, where: str) -> bytes:
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(MAX_INFLATED_BYTES + 1)
    except (OSError, EOFError) as exc:
        raise DatasetInvalid(f"{where}: {what} is a broken gzip file: {exc} (rule: readable format)") from exc
    if len(data) > MAX_INFLATED_BYTES:
        raise DatasetInvalid(f"{where}: {what} inflates past {MAX_INFLATED_BYTES} bytes (rule: readable format)")
    return data


def _read_idx(raw: bytes, what: str, ndim: int, where: str) -> np.ndarray:
    """One IDX file (optionally gzip-compressed) as an array of `ndim` dimensions."""
    data = _inflate(raw, what, where)
    expected = IMAGES_MAGIC if ndim == 3 else LABELS_MAGIC
    if len(data) < 4:
        raise DatasetInvalid(
            f"{where}: {what} has {len(data)} bytes, too short for an IDX header (rule: readable format)"
        )
    magic = int.from_bytes(data[:4], "big")
    if data[:2] != b"\0\0" or data[2] not in IDX_TYPES or data[3] != ndim:
        raise DatasetInvalid(
            f"{where}: {what} has magic number 0x{magic:08X}, expected an IDX file with {ndim} "
            f"dimension(s) such as 0x{expected:08X} (rule: readable format)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetInvalid(f"{where}: {what} is truncated inside its header (rule: readable format)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    needed = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < needed:
        raise DatasetInvalid(
            f"{where}: {what} is truncated: its header declares {dims} values ({needed} bytes) "
            f"but the file has {len(data)} bytes (rule: readable format)"
        )
    if len(data) > needed:
        raise DatasetInvalid(
            f"{where}: {what} has {len(data) - needed} bytes after the {dims} values its header "
            f"declares (rule: readable format)"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)


def _read_npz(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not raw.startswith(ZIP_MAGIC):
        # Checked first: numpy would take anything else for a pickle and blame that instead.
        kind = "a single .npy array" if raw.startswith(b"\x93NUMPY") else f"not a zip archive (starts {raw[:8]!r})"
        raise DatasetInvalid(f"{where}: cannot be read as NPZ: {kind}, expected arrays x and y (rule: readable format)")
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetInvalid(f"{where}: cannot be read as NPZ: {exc} (rule: readable format)") from exc
    with archive:
        names = set(archive.files)
        for x_name, y_name in NPZ_KEYS:
            if {x_name, y_name} <= names:
                try:
                    return archive[x_name], archive[y_name]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                    raise DatasetInvalid(
                        f"{where}: array {x_name!r} or {y_name!r} cannot be read: {exc} (rule: readable format)"
                    ) from exc
    wanted = " or ".join(f"{x!r} and {y!r}" for x, y in NPZ_KEYS)
    raise DatasetInvalid(f"{where}: NPZ holds arrays {sorted(names)}, expected {wanted} (rule: readable format)")


def _as_pair(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, h, w) of numbers and integer labels (n,), as uploaded."""
    if x.dtype.kind not in "uif":
        raise DatasetInvalid(f"{where}: images have dtype {x.dtype}, expected numbers (rule: readable format)")
    if y.dtype.kind not in "uif":
        raise DatasetInvalid(f"{where}: labels have dtype {y.dtype}, expected integers (rule: readable format)")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]  # one grey channel, as Keras-style arrays often carry it
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetInvalid(
            f"{where}: labels have shape {y.shape}, expected one label per image (rule: readable format)"
        )
    if x.ndim == 0 or len(x) != len(y):
        count = x.shape[0] if x.ndim else 0
        raise DatasetInvalid(f"{where}: {count} images but {len(y)} labels (rule: consistent pair)")
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y))):
        raise DatasetInvalid(f"{where}: labels are not all whole numbers (rule: label values)")
    return x, y.astype(np.int64)


def read_images(fmt: str, parts: dict[str, bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images x (n, h, w), values as stored, and integer labels y (n,) from an uploaded dataset.

    fmt "npz": parts {"data": bytes} with arrays x and y (or MNIST's x_train and y_train).
    fmt "idx": parts {"images": IDX3 bytes, "labels": IDX1 bytes}, each optionally gzip-compressed.
    """
    if fmt == "npz":
        x, y = _read_npz(parts["data"], where)
    elif fmt == "idx":
        x = _read_idx(parts["images"], "images file", 3, where)
        y = _read_idx(parts["labels"], "labels file", 1, where)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected npz or idx")
    return _as_pair(x, y, where)


def write_idx(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """IDX3 images and IDX1 labels, the files MNIST ships (unsigned bytes when the values fit)."""

    def encode(values: np.ndarray, ndim: int) -> bytes:
        values = np.asarray(values)
        if values.ndim != ndim:
            raise ValueError(f"expected {ndim} dimension(s), got shape {values.shape}")
        if values.dtype.kind in "ui" and values.size and values.min() >= 0 and values.max() <= 255:
            values = values.astype(np.uint8)
        elif values.dtype.kind == "u":
            values = values.astype(np.int32)
        code = _IDX_CODES.get(values.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"IDX cannot hold dtype {values.dtype}")
        header = bytes([0, 0, code, ndim]) + np.asarray(values.shape, dtype=">u4").tobytes()
        return header + values.astype(np.dtype(IDX_TYPES[code])).tobytes()

    return encode(images, 3), encode(labels, 1)


def write_npz(x: np.ndarray, y: np.ndarray) -> bytes:
    """An NPZ archive with arrays x and y, compressed."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.asarray(x), y=np.asarray(y))
    return buffer.getvalue()


def check_images(
    x: np.ndarray,
    y: np.ndarray,
    *,
    shape: tuple[int, int],
    max_value: float,
    classes: list[int] | None,
    min_rows: int,
    min_class_fraction: float,
    where: str,
) -> None:
    """Raise DatasetInvalid naming the first broken rule."""
    shape = tuple(int(s) for s in shape)
    if x.ndim != 3 or tuple(x.shape[1:]) != shape:
        raise DatasetInvalid(
            f"{where}: images have shape {tuple(x.shape[1:])}, expected {shape[0]}x{shape[1]} (rule: image shape)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetInvalid(f"{where}: {len(x)} images but labels of shape {y.shape} (rule: consistent pair)")
    min_rows = max(min_rows, 1)
    if len(x) < min_rows:
        raise DatasetInvalid(f"{where}: {len(x)} images, need at least {min_rows} (rule: minimum rows)")
    flat = x.reshape(len(x), -1)
    if x.dtype.kind == "f":
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise DatasetInvalid(
                f"{where}: {int(bad.sum())} image(s) hold NaN or infinite values, the first at index "
                f"{int(np.argmax(bad))} (rule: value range)"
            )
    low, high = flat.min(axis=1), flat.max(axis=1)
    bad = (low < 0) | (high > max_value)
    if bad.any():
        first = int(np.argmax(bad))
        raise DatasetInvalid(
            f"{where}: {int(bad.sum())} image(s) have values outside [0, {max_value:g}], the first at index "
            f"{first} ({low[first]:g}..{high[first]:g}) (rule: value range)"
        )
    labels, counts = np.unique(y, return_counts=True)
    if classes is not None:
        declared = {int(c) for c in classes}
        unknown = [int(v) for v in labels if int(v) not in declared]
        if unknown:
            raise DatasetInvalid(
                f"{where}: label(s) {unknown[:10]} not among the declared classes {sorted(declared)} "
                "(rule: label values)"
            )
        # A declared class with no images is the rarest of all.
        present = dict(zip(labels.tolist(), counts.tolist(), strict=True))
        labels = np.asarray(sorted(declared))
        counts = np.asarray([present.get(c, 0) for c in labels.tolist()])
    if np.count_nonzero(counts) < 2:
        raise DatasetInvalid(
            f"{where}: only {np.count_nonzero(counts)} class present, need at least 2 (rule: class balance)"
        )
    rarest = int(np.argmin(counts))
    if counts[rarest] < min_class_fraction * len(y):
        raise DatasetInvalid(
            f"{where}: class {int(labels[rarest])} has {int(counts[rarest])} of {len(y)} images "
            f"({counts[rarest] / len(y):.1%}), below the minimum {min_class_fraction:.1%} (rule: class balance)"
        )
