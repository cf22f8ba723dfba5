"""Core: the configuration and the contract every other package shares.

Owns the settings (`.env` and the environment), the pipeline files, the types that cross process and
service boundaries (`Upload`, `StepResult`), every MLflow tag, alias and artifact name (`schema`),
the errors they carry, scoring, and the one poll loop (`waiting`). Imports only `flywheel.frameworks`
(a pipeline file names one); importing any of it changes nothing.
"""
