"""Training: from an upload to a gated, registered model version.

Planning (which upload trains) and the uploads ledger run in Airflow's environment; the steps
`validate` and `train` run in the ML one (`python -m flywheel.training.<step>`), wherever the
runner puts them. Datasets and images read and check uploads; the gate decides; the registry moves
the aliases. Imports `frameworks`, `core`, `clients`; never `serving`.
"""
