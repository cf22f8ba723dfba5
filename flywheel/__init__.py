"""Flywheel: event-driven train-to-serve. Each subpackage owns one concern; imports point down only.

    cli             the `flywheel` command
    orchestration   Airflow's side: what each DAG task does, where a step runs, the events bridge's logic
    operations      what an operator sees and does: status, lineage, alerts, dead letters, rollback
    serving         from a registered version to answers: the Bento build, the rollout
    training        from an upload to a gated, registered version: planning, ledger, validation, training
    platform        the processes: topology, supervisord, reaper, provisioning, routes, deployments
    clients         the services' APIs (MinIO, MLflow, Airflow, Prometheus, supervisord) and the client library
    core            configuration and contract: settings, pipeline files, Upload, StepResult, the MLflow schema
    frameworks      model families as plugins (XGBoost, TensorFlow, scikit-learn)

`serving` and `training` are siblings that never import each other. The contracts are checked by
import-linter (`make lint`, pyproject.toml); docs/architecture.md draws them.
"""
