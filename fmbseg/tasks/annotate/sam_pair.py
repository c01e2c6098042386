"""The SAM stages' one worker: each image decoded once and embedded once for both stages.

``sam_prompt`` and ``sam_auto`` stay two versioned stages, with their own fingerprints,
shards, receipts and manifests, byte for byte what each would write alone (a changed SAM
threshold still reruns ``sam_auto`` only). Run one after the other, every image would be
read, decoded and run through SAM's image encoder (most of SAM's time) twice. The engine
runs them as one pass of :class:`SamPairWorker` writing only the stages not yet committed
(``StageRun.targets``): per image, the prompts first, then the automatic masks from the same
embedding (:meth:`fmbseg.models.sam.SamSegmenter.generate`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
from fmbseg.tasks.annotate.common import (
    TEACHER_KEY,
    VOCABULARY_KEY,
    Rows,
    read_vocabulary,
    teacher,
)
from fmbseg.tasks.annotate.sam_auto import STAGE as AUTO
from fmbseg.tasks.annotate.sam_auto import auto_job
from fmbseg.tasks.annotate.sam_prompt import STAGE as PROMPT
from fmbseg.tasks.annotate.sam_prompt import prompt_job
from fmbseg.tasks.annotate.sam_stage import SamStageWorker

__all__ = ["SamPairWorker", "prepare"]


class SamPairWorker(SamStageWorker):
    """Shard worker of sam_prompt and/or sam_auto; ``process`` returns one ``(records,
    errors)`` pair per stage of ``fps`` (``{stage: fp}``, in pipeline order); each stage's
    records carry its own fingerprint."""

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        vocabulary: tuple[str, ...],
        fps: Mapping[str, str],
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        unknown = set(fps) - {PROMPT, AUTO}
        if unknown or not fps:
            raise ValueError(f"SamPairWorker: stages {sorted(fps)}; expected {PROMPT}, {AUTO}")
        SamStageWorker.__init__(self, store, cfg, vocabulary, storage_options)
        self.fps = {s: fps[s] for s in (PROMPT, AUTO) if s in fps}

    def _prompt(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        cfg = self.cfg.sam_prompt
        return prompt_job(self.segmenter, image, clip, self.vocabulary, cfg, self.fps[PROMPT])

    def _auto(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        # after _prompt's set_image of this very array: SAM does not embed it again
        cfg = self.cfg.sam_auto
        return auto_job(self.segmenter, image, clip, self.vocabulary, cfg, self.fps[AUTO])

    def process(self, shard: int, spec: dict[str, str]) -> list[tuple[pa.Table, pa.Table]]:
        jobs = {PROMPT: self._prompt, AUTO: self._auto}
        return self.label_shard(shard, spec, [(s, jobs[s]) for s in self.fps])


def prepare(job: StageRun) -> Prepared:
    """The SAM pass over a committed clip_dense output for the stages in ``job.targets``."""
    clip_fp = job.fp("clip_dense")
    clip = job.store.require_manifest("clip_dense", clip_fp)
    vocabulary = read_vocabulary(clip)
    fps = {stage: job.fp(stage) for stage in job.targets}
    factory = functools.partial(
        SamPairWorker, job.store, job.cfg, vocabulary, fps, job.storage_options
    )
    specs = [{"clip_dense": clip_fp}] * clip.num_shards
    meta = {VOCABULARY_KEY: list(vocabulary), "clip_dense": clip_fp, TEACHER_KEY: teacher(job.cfg)}
    return Prepared(specs, factory, meta)
