"""The deploy DAG's `judge` task: a live rollout decided step by step, waiting on the triggerer.

Between two looks the task is deferred (a TimeDeltaTrigger on the triggerer): Airflow shows it as
deferred and it holds no worker slot while the candidate bakes. Each look runs serving/live.py's
`judge` on the rollout's state file, so a scheduler, worker or triggerer killed mid-rollout loses
nothing: the retried or resumed task reads the same state. It succeeds (emitting the deployment
asset) when the candidate is promoted, and fails without retries, with the reason in its alert,
when the rollout is aborted. For a blue/green rollout there is nothing to judge: it passes at once.
"""

from __future__ import annotations

import datetime

from airflow.sdk import BaseOperator


class JudgeRollout(BaseOperator):
    ui_color = "#f6e3c7"

    def __init__(self, *, pipeline: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def execute(self, context, event=None):
        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
        from airflow.sdk.exceptions import AirflowFailException

        from flywheel.orchestration import tasks

        verdict = tasks.judge(self.pipeline, context["ti"].xcom_pull(task_ids="rollout"))
        if verdict["status"] == "running":
            self.log.info("waiting %.0f s: %s", verdict["wait"], verdict["reason"])
            self.defer(trigger=TimeDeltaTrigger(datetime.timedelta(seconds=verdict["wait"])), method_name="execute")
        if verdict["status"] == "aborted":
            raise AirflowFailException(f"{self.pipeline}: {verdict['reason']}")
        for asset in self.outlets:
            context["outlet_events"][asset].extra = verdict["deployment"] or {}
        return verdict
