"""The stage engine: a stage is declared once (:class:`Stage`) and one runner executes it
(fingerprint, skip what is committed, shard, run locally or on Ray, commit receipts and the
manifest)."""

from fmbseg.engine.runner import (
    ERRORS_SCHEMA,
    ShardWorker,
    StageError,
    errors_table,
    plan_shards,
    run_stage,
)
from fmbseg.engine.stage import Prepared, Stage, StageRun, plan, run

__all__ = [
    "ERRORS_SCHEMA",
    "Prepared",
    "ShardWorker",
    "Stage",
    "StageError",
    "StageRun",
    "errors_table",
    "plan",
    "plan_shards",
    "run",
    "run_stage",
]
