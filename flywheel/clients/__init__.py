"""Clients: the APIs of the services the platform runs, and the Flywheel client library.

MinIO (`objectstore`), MLflow's REST API (`mlflow_rest`, for Airflow's environment) and Python client
(`tracking`, for the ML one), Airflow's REST API (`airflow_rest`), Prometheus, supervisord's
XML-RPC, wrk (`load`), and `api`: what a user does from outside (upload, predict, wait for a version).
Imports only `core`.
"""
