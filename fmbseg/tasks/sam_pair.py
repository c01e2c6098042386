"""Both SAM stages in one pass over the shards: each image decoded once and embedded once.

``sam_prompt`` and ``sam_auto`` stay two versioned stages, with their own fingerprints,
shards, receipts and manifests, byte for byte what each writes alone (a changed SAM
threshold still reruns ``sam_auto`` only). They differ only in what they do with SAM's
image embedding: point prompts, or the automatic grid. Run one after the other, every image
would be read, decoded and run through SAM's image encoder (most of SAM's time: ViT-H at
1024 px) twice. When neither is committed, :func:`run_sam_stages` runs them together
(:func:`fmbseg.tasks.runner.run_stages`): per image, the prompts first, then the
automatic masks from the same embedding (:meth:`fmbseg.models.sam.SamSegmenter.generate`).
Otherwise the missing one runs alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.clip_dense import ClipDenseResult
from fmbseg.tasks.runner import Progress, run_stages
from fmbseg.tasks.sam_auto import STAGE as AUTO
from fmbseg.tasks.sam_auto import auto_job, run_sam_auto
from fmbseg.tasks.sam_prompt import STAGE as PROMPT
from fmbseg.tasks.sam_prompt import prompt_job, run_sam_prompt
from fmbseg.tasks.sam_stage import Rows, SamStageWorker
from fmbseg.tasks.stage1 import (
    TEACHER_KEY,
    VOCABULARY_KEY,
    num_shards,
    read_vocabulary,
    stage_fingerprint,
    teacher,
)

__all__ = ["SamPairWorker", "run_sam_stages"]


class SamPairWorker(SamStageWorker):
    """Shard worker of sam_prompt and sam_auto at once; ``process`` returns both outputs.

    ``fp`` is ``(sam_prompt fp, sam_auto fp)``; each stage's records carry its own.
    """

    stage = f"{PROMPT}+{AUTO}"

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        vocabulary: tuple[str, ...],
        fps: tuple[str, str],
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(store, cfg, vocabulary, fps[0], storage_options)
        self.prompt_fp, self.auto_fp = fps

    def _prompt(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        cfg = self.cfg.sam_prompt
        return prompt_job(self.segmenter, image, clip, self.vocabulary, cfg, self.prompt_fp)

    def _auto(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        # after _prompt's set_image of this very array: SAM does not embed it again
        cfg = self.cfg.sam_auto
        return auto_job(self.segmenter, image, clip, self.vocabulary, cfg, self.auto_fp)

    def process(  # type: ignore[override]
        self, shard: int, spec: dict[str, str]
    ) -> list[tuple[pa.Table, pa.Table]]:
        return self.label_shard(shard, spec, [(PROMPT, self._prompt), (AUTO, self._auto)])


def run_sam_stages(
    store: ArtifactStore,
    cfg: Config,
    clip_fp: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Mapping[str, Progress] | None = None,
) -> dict[str, str]:
    """Run (or reuse) sam_prompt and sam_auto on a committed clip_dense output.

    Returns ``{"sam_prompt": fp, "sam_auto": fp}``. ``progress[stage](done, total)``
    counts each stage's shards (in a shared pass both advance together).
    """
    progress = progress or {}
    fps = {
        stage: stage_fingerprint(stage, cfg, {"clip_dense": clip_fp}) for stage in (PROMPT, AUTO)
    }
    if any(store.is_committed(stage, fp) for stage, fp in fps.items()):
        run_sam_prompt(
            store, cfg, clip_fp, storage_options=storage_options, progress=progress.get(PROMPT)
        )
        run_sam_auto(
            store, cfg, clip_fp, storage_options=storage_options, progress=progress.get(AUTO)
        )
        return fps
    vocabulary = read_vocabulary(store, "clip_dense", clip_fp)
    factory = functools.partial(
        SamPairWorker, store, cfg, vocabulary, (fps[PROMPT], fps[AUTO]), storage_options
    )
    listeners = [progress[s] for s in (PROMPT, AUTO) if s in progress]

    def both(done: int, total: int) -> None:
        for listener in listeners:
            listener(done, total)

    run_stages(
        store,
        [(PROMPT, fps[PROMPT]), (AUTO, fps[AUTO])],
        [{"clip_dense": clip_fp}] * num_shards(store, "clip_dense", clip_fp),
        factory,
        cfg.runtime,
        use_gpu=True,
        progress=both,
        meta={VOCABULARY_KEY: list(vocabulary), "clip_dense": clip_fp, TEACHER_KEY: teacher(cfg)},
        timed=True,
    )
    return fps
