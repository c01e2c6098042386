"""Stage `sam3` (ours), the shell: SAM 3's text concepts label the index's images.

The teacher ``models.teacher: sam3`` replaces clip_dense + the SAM stages: per image, SAM 3
runs once for the whole vocabulary (:mod:`~fmbseg.tasks.annotate.sam3_concepts`). ``merge``
composes its records into the same label maps and ``export`` writes them the same way, so
stage 2 trains on them unchanged.

A spec is ``{"index": index_fp}``; shard ``i`` labels index shard ``i``. An image with no
class present (or no mask above the score threshold) gets a ``no_class_present`` errors row
(a result: exported with no label); one that fails to load or segment, a row naming why.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any

import pyarrow as pa

from fmbseg.config import Config
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import MaskRecords, error_row, errors_table
from fmbseg.tasks.annotate.common import (
    INDEX_STAGE,
    POST_AHEAD,
    TEACHER_KEY,
    VOCABULARY_KEY,
    ImageShardWorker,
    error_from,
    post_pool,
)
from fmbseg.tasks.annotate.sam3_concepts import concept_job

STAGE = "sam3"
INDEX_COLUMNS = ("image_id", "uri")


def teacher(cfg: Config) -> dict[str, Any]:
    """``models.sam3`` and ``sam3_weights``: in the stage's fingerprint and manifest meta."""
    return {"sam3": cfg.models.sam3, "sam3_weights": cfg.models.sam3_weights}


class Sam3Worker(ImageShardWorker):
    """Shard worker of sam3: SAM 3 built once; SAM 3 runs in this thread, the records of
    the previous image are built in the post thread meanwhile."""

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        vocabulary: tuple[str, ...],
        fp: str,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from fmbseg.models.registry import build_from_config

        ImageShardWorker.__init__(self, store, cfg, storage_options)
        self.vocabulary, self.fp = tuple(vocabulary), fp
        self.segmenter = build_from_config(
            cfg.models, "sam3", cfg.runtime.device, store_options=store.storage_options
        )
        self.post = post_pool()

    def prefetch(self, shard: int, spec: dict[str, str]) -> None:
        up, fp = self.upstream, spec["index"]
        up.prefetch(INDEX_STAGE, fp, shard, columns=INDEX_COLUMNS, then=self._start_index)

    def process(self, shard: int, spec: dict[str, str]) -> tuple[pa.Table, pa.Table]:
        index = self.upstream.read(INDEX_STAGE, spec["index"], shard, columns=INDEX_COLUMNS)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []

        def done(row: dict[str, Any], job: Future[list[dict[str, Any]]]) -> None:
            try:
                found = job.result()
            except Exception as exc:  # this image's failure, not the shard's
                errors.append(error_from(exc, row["image_id"], row["uri"], STAGE))
                return
            if not found:
                message = (
                    "SAM 3 found no vocabulary class present with a mask above sam3.score_threshold"
                )
                errors.append(
                    error_row(row["image_id"], row["uri"], STAGE, "no_class_present", message)
                )
            rows.extend(found)

        post = InOrder(self.post, done, POST_AHEAD)
        cfg = self.cfg.sam3
        items = index.to_pylist() if index.num_columns else []
        for row, image, exc in self.images.each(items, lambda r: r["uri"]):
            try:
                if exc is not None:
                    raise exc
                assert image is not None
                job = concept_job(
                    self.segmenter,
                    image,
                    row["image_id"],
                    row["uri"],
                    self.vocabulary,
                    cfg,
                    self.fp,
                )
                post.submit(row, job)
            except Exception as err:
                post.failed(row, err)
        post.drain()
        return MaskRecords.from_rows(rows).table, errors_table(errors)


def prepare(job: StageRun) -> Prepared:
    """sam3 over a committed index: one spec per index shard; the vocabulary goes in the
    manifest meta, where merge and export read it."""
    store, index_fp, vocabulary = job.store, job.fp(INDEX_STAGE), tuple(job.vocabulary)
    factory = functools.partial(
        Sam3Worker, store, job.cfg, vocabulary, job.fp(STAGE), job.storage_options
    )
    meta = {VOCABULARY_KEY: list(vocabulary), "index": index_fp, TEACHER_KEY: teacher(job.cfg)}
    specs = [{"index": index_fp}] * store.require_manifest(INDEX_STAGE, index_fp).num_shards
    return Prepared(specs, factory, meta)
