"""Inference: what serving answered, and what the world said back about it.

Every Bento replica appends one JSON line per answered request (request id, time, model version,
role, inputs, prediction, latency) to its own spool file, once a second, off the request's path
(bento/provenance.py). The `inference` service (services/inference/app.py) ships the spool:

- **records.py**: the record, the spool's file names, and the Parquet schema;
- **store.py**: a SQLite index of recent answers by request id, and the feedback joined to them
  (what feedback matching and the live scores read), with its retention;
- **collector.py**: spool → index → Parquet batches in MinIO (`s3://inference/<p>/…`), at least
  once: a spool file goes only once both hold its lines;
- **feedback.py**: `POST /<p>/feedback` bodies checked, matched by request id, and scored per
  version and role (`flywheel_live_score`).

Imports: core and clients only. Nothing here imports training or serving; the rollout judge
(serving/live.py) reads the live figures over HTTP (clients/inference.py).
"""
