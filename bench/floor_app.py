"""The HTTP floor: the smallest ASGI app that serves the same Booster and the same JSON as a Bento.

No framework: parse the body, predict, answer with the provenance a Bento gives. Run under uvicorn
with uvloop and httptools, one worker, as the Bentos run; bench/serving.py compares every serving
path with it, so "the Bento path is at X % of the floor" compares like with like.

    FLOOR_MODEL=iris:v1 .venv/ml/bin/uvicorn floor_app:app --app-dir bench --port 3190 --no-access-log
"""

from __future__ import annotations

import gc
import json
import os
import uuid

import bentoml
import numpy as np
import xgboost

_ref = bentoml.models.get(os.environ["FLOOR_MODEL"])
_info = _ref.info.metadata
BOOSTER = xgboost.Booster(model_file=_ref.path_of("model.ubj"))
BOOSTER.set_param({"nthread": 1})
CLASSES = list(_info.get("classes") or [])
FEATURES = list(_info["features"])
META = {
    "model": {"pipeline": _info["pipeline"], "name": _info["pipeline"], "version": str(_info["version"])},
    "dataset": {k: _info["dataset"].get(k) for k in ("uri", "key", "etag", "version_id")},
}
HEADERS = [
    (b"content-type", b"application/json"),
    (b"x-model-name", _info["pipeline"].encode()),
    (b"x-model-version", str(_info["version"]).encode()),
]
BOOSTER.inplace_predict(np.zeros((1, len(FEATURES)), dtype=np.float32))
gc.collect()
gc.freeze()


def _predict(rows: list) -> list:
    scores = BOOSTER.inplace_predict(np.asarray(rows, dtype=np.float32))
    if not CLASSES:
        return scores.astype(float).tolist()
    indices = scores.argmax(axis=1) if scores.ndim == 2 else scores.astype(int)
    return [CLASSES[i] for i in indices]


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        if scope["method"] == "GET":  # the readiness check
            raise ValueError('ready: POST {"inputs": [...]}')
        rows = json.loads(body)["inputs"]
        if not rows or any(len(r) != len(FEATURES) for r in rows):
            raise ValueError("bad rows")
        status, answer = 200, {"predictions": _predict(rows), **META}
    except (ValueError, KeyError, TypeError) as exc:
        status, answer = (200 if scope["method"] == "GET" else 400), {"error": str(exc)}
    request_id = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()
    payload = json.dumps(answer).encode()
    headers = [*HEADERS, (b"x-request-id", request_id), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
