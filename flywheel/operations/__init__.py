"""Operations: what an operator sees and does.

Per-pipeline status, lineage from an answer back to its upload, alerts (recorded and forwarded),
dead letters, serving metrics, and the rollback. Imports everything below it, never `orchestration`.
"""
