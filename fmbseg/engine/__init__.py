"""The stage engine: a stage is declared once and one runner executes it (fingerprint, skip
what is committed, shard, run locally or on Ray, commit receipts and the manifest)."""

from fmbseg.engine.runner import (
    ERRORS_SCHEMA,
    ShardWorker,
    StageError,
    errors_table,
    plan_shards,
    run_stage,
)

__all__ = ["ERRORS_SCHEMA", "ShardWorker", "StageError", "errors_table", "plan_shards", "run_stage"]
