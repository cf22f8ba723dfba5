"""Airflow's command line with one upstream fix applied first: every Airflow process starts here.

Airflow 3.3.2 answers 500 on any list of asset events that holds an event whose Dag run is still
queued: a queued run has no start date, and three response models declare it required
(apache/airflow#71360, fixed by #71379 after 3.3.2). Flywheel's train DAGs run one at a time, so an
upload that lands while its pipeline trains creates a run that waits queued for minutes, and for
those minutes `GET /api/v2/assets/events` (the reconciler, `flywheel lineage`) and the Task SDK's
`inlet_events` (the uploads ledger in `tasks.account`) fail for that asset.

The fix is the upstream one: `start_date` may be null. It has to land before Airflow builds
anything from these models (Cadwyn's versioned copies, FastAPI's response adapters, the Task SDK's
message decoders), hence a wrapper around `airflow` rather than a plugin, which loads too late.
Delete this module when the Airflow pin moves past the release that carries #71379.

    python -m flywheel.orchestration.airflow_main scheduler --skip-serve-logs
"""

from __future__ import annotations

import sys
from datetime import datetime

from pydantic import AwareDatetime, BaseModel
from pydantic.fields import FieldInfo


def _allow_null_start_date(model: type[BaseModel], annotation: object, dependents: tuple[type[BaseModel], ...]) -> None:
    field = model.model_fields["start_date"]
    if not field.is_required():
        return  # already fixed upstream: nothing to do
    model.model_fields["start_date"] = FieldInfo.merge_field_infos(field, annotation=annotation | None, default=None)
    model.__annotations__["start_date"] = annotation | None
    for m in (model, *dependents):
        m.model_rebuild(force=True)


def apply() -> None:
    """Let a Dag run referenced by an asset event have no start date, in the three models that say so."""
    from airflow.api_fastapi.core_api.datamodels import assets as core
    from airflow.api_fastapi.execution_api.datamodels import asset_event as execution
    from airflow.sdk.api.datamodels import _generated as sdk
    from airflow.sdk.execution_time import comms  # imported with airflow itself: its subclasses need a rebuild too

    _allow_null_start_date(
        core.DagRunAssetReference, datetime, (core.AssetEventResponse, core.AssetEventCollectionResponse)
    )
    _allow_null_start_date(
        execution.DagRunAssetReference, datetime, (execution.AssetEventResponse, execution.AssetEventsResponse)
    )
    _allow_null_start_date(
        sdk.DagRunAssetReference,
        AwareDatetime,
        (sdk.AssetEventResponse, sdk.AssetEventsResponse, comms.AssetEventResult, comms.AssetEventsResult),
    )


apply()  # at import: also in processes that re-import this module as __mp_main__ (uvicorn's workers)

if __name__ == "__main__":
    from airflow.__main__ import main

    sys.argv[0] = "airflow"
    sys.exit(main())
