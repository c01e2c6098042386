"""Pipeline stages: a pure core per stage plus the shard runner that executes them."""

from fmbseg.tasks.index import index_images, read_index, run_index
from fmbseg.tasks.runner import (
    ERRORS_SCHEMA,
    ShardWorker,
    StageError,
    errors_table,
    plan_shards,
    run_stage,
)

__all__ = [
    "ERRORS_SCHEMA",
    "ShardWorker",
    "StageError",
    "errors_table",
    "index_images",
    "plan_shards",
    "read_index",
    "run_index",
    "run_stage",
]
