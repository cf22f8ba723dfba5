"""Feedback: the true outcome of earlier answers, by the X-Request-Id they carried.

    {"request_id": "…", "label": "setosa"}                       one
    {"feedback": [{"request_id": "…", "label": 0.42}, …]}        many (up to MAX_ITEMS)

A label is one value for an answer of one row, or a list with one value per row. The answer says,
item by item, what was matched; an unknown or expired request id, a label of the wrong shape or
kind, is reported for that item and never stops the others.
"""

from __future__ import annotations

import math
import re

from flywheel.core.pipelines import Pipeline
from flywheel.inference.store import Store

MAX_ITEMS = 1000
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what a Bento accepts as a client's request id


class BadFeedback(ValueError):
    """The body as a whole is wrong (not a feedback object, too many items): a 400."""


def items_of(body) -> list:
    if not isinstance(body, dict):
        raise BadFeedback('expected {"request_id": ..., "label": ...} or {"feedback": [...]}')
    if "feedback" in body:
        items = body["feedback"]
        if not isinstance(items, list) or not items:
            raise BadFeedback('"feedback" must be a non-empty list of {"request_id": ..., "label": ...}')
        if len(items) > MAX_ITEMS:
            raise BadFeedback(f"at most {MAX_ITEMS} items per request, got {len(items)}")
        return items
    return [body]


def _label_problem(pipeline: Pipeline, value) -> str | None:
    if pipeline.task == "classification":
        if isinstance(value, bool) or not isinstance(value, str | int):
            return f"a label of {pipeline.name} is a class name (text or an integer), got {value!r}"
        classes = pipeline.classes
        if classes and str(value) not in {str(c) for c in classes}:
            return f"{value!r} is not a class of {pipeline.name} ({', '.join(map(str, classes))})"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"a label of {pipeline.name} is a finite number, got {value!r}"
    return None


def record(store: Store, pipeline: Pipeline, body) -> dict:
    """Check, match and store; the answer lists every item's fate."""
    items = items_of(body)
    results, labels = [], {}
    wanted = [i.get("request_id") for i in items if isinstance(i, dict) and isinstance(i.get("request_id"), str)]
    answers = store.answers(pipeline.name, wanted)
    for item in items:
        rid = item.get("request_id") if isinstance(item, dict) else None
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            results.append({"request_id": rid, "matched": False, "error": "request_id must be a plain token"})
            continue
        if "label" not in item:
            results.append({"request_id": rid, "matched": False, "error": "no label"})
            continue
        answer = answers.get(rid)
        if answer is None:
            results.append(
                {
                    "request_id": rid,
                    "matched": False,
                    "error": f"no answer of {pipeline.name} with this request id "
                    "(unknown, not sampled by inference_log.sample, or older than the inference index keeps)",
                }
            )
            continue
        label = item["label"] if isinstance(item["label"], list) else [item["label"]]
        if len(label) != len(answer["predictions"]):
            results.append(
                {
                    "request_id": rid,
                    "matched": False,
                    "error": f"the answer had {len(answer['predictions'])} prediction(s), the label has {len(label)}",
                }
            )
            continue
        if problem := next((p for v in label if (p := _label_problem(pipeline, v))), None):
            results.append({"request_id": rid, "matched": False, "error": problem})
            continue
        labels[rid] = label
        results.append({"request_id": rid, "matched": True, "version": answer["version"], "role": answer["role"]})
    if labels:
        store.add_feedback(pipeline.name, labels)
    matched = sum(r["matched"] for r in results)
    return {"pipeline": pipeline.name, "matched": matched, "unmatched": len(results) - matched, "items": results}
