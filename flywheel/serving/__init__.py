"""Serving: from a registered model version to answers behind Nginx.

`build` (a step in the ML environment) makes the Bento of exactly one version; `rollout` starts its
replicas, proves them with the stored holdout and switches traffic, keeping the live one on failure.
Imports `frameworks`, `core`, `clients`, `platform`; never `training`.
"""
