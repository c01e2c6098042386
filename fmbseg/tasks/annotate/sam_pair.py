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
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import MaskRecords, error_row, errors_table
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult, result_from_row
from fmbseg.tasks.annotate.common import (
    ABSENT,
    POST_AHEAD,
    TEACHER_KEY,
    VOCABULARY_KEY,
    ImageShardWorker,
    Rows,
    error_from,
    post_pool,
    read_vocabulary,
    teacher,
)
from fmbseg.tasks.annotate.sam_auto import STAGE as AUTO
from fmbseg.tasks.annotate.sam_auto import auto_job
from fmbseg.tasks.annotate.sam_prompt import STAGE as PROMPT
from fmbseg.tasks.annotate.sam_prompt import prompt_job

__all__ = ["SamPairWorker", "TooLargeForSam", "prepare"]


class TooLargeForSam(ValueError):
    """An image whose SAM pass would need more memory than the device has."""

    kind = "too_large"  # the errors table's error_type: TooLargeForSam:too_large


def device_memory(device: Any) -> int:
    """Total bytes of ``device``'s memory (a CUDA GPU's, else this machine's RAM)."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sam_bytes(stage: str, image: np.ndarray, clip: Any, cfg: Config, device: Any) -> int:
    """About the most memory SAM's mask decoder needs on one image: segment-anything
    upsamples each pass's mask logits to the image's full size as float32, 3 candidates per
    prompt (12 bytes a pixel a prompt); a pass has one prompt per present class
    (sam_prompt) or ``sam_auto.points_per_batch`` prompts (sam_auto)."""
    import torch

    from fmbseg.models.sam import points_per_batch

    pixels = int(image.shape[0]) * int(image.shape[1])
    if stage == "sam_auto":
        prompts = points_per_batch(cfg.sam_auto.points_per_batch, torch.device(device))
    else:
        prompts = max(1, len(clip.present))
    return 12 * prompts * pixels


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class SamPairWorker(ImageShardWorker):
    """Shard worker of sam_prompt and/or sam_auto: SAM built once, images from clip_dense rows.

    A spec is ``{"clip_dense": clip_fp}``; the output shard has the same number. ``process``
    returns one ``(records, errors)`` pair per stage of ``fps`` (``{stage: fp}``, in pipeline
    order), in image order; each stage's records carry its own fingerprint. SAM runs in the
    worker's thread; the CPU work on its output runs in a post thread meanwhile, on the
    previous image. Images with no present class are not run through SAM and get a
    ``no_class_present`` error row; images that fail to load, to segment or to become
    records get an error row naming the exception (a failure is that stage's error).
    """

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        vocabulary: tuple[str, ...],
        fps: Mapping[str, str],
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from fmbseg.models.registry import build_from_config

        unknown = set(fps) - {PROMPT, AUTO}
        if unknown or not fps:
            raise ValueError(f"SamPairWorker: stages {sorted(fps)}; expected {PROMPT}, {AUTO}")
        ImageShardWorker.__init__(self, store, cfg, storage_options)
        self.fps = {s: fps[s] for s in (PROMPT, AUTO) if s in fps}
        self.vocabulary = tuple(vocabulary)
        self.segmenter = build_from_config(
            cfg.models,
            "sam",
            cfg.runtime.device,
            store_options=store.storage_options,
            auto_config=cfg.sam_auto,
        )
        self.post = post_pool()  # records of one image are built while SAM runs the next
        self._memory: int | None = None  # the device's, read at the first image

    def _check_memory(self, stage: str, image: np.ndarray, clip: Any) -> None:
        """Raise :class:`TooLargeForSam` (that image's errors row) rather than let SAM's
        allocation fail or the kernel kill the worker for memory."""
        device = getattr(self.segmenter, "device", "cpu")
        need = sam_bytes(stage, image, clip, self.cfg, device)
        if self._memory is None:
            self._memory = device_memory(device)
        if need > self._memory:
            h, w = image.shape[:2]
            raise TooLargeForSam(
                f"{clip.image_uri}: a {w}x{h} image needs ~{_size(need)} for {stage}'s "
                f"mask decoder (12 bytes a pixel a prompt), more than the {device} device's "
                f"{_size(self._memory)}: lower index.max_pixels"
                + (" or sam_auto.points_per_batch" if stage == "sam_auto" else "")
            )

    def _prompt(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        cfg = self.cfg.sam_prompt
        return prompt_job(self.segmenter, image, clip, self.vocabulary, cfg, self.fps[PROMPT])

    def _auto(self, image: np.ndarray, clip: ClipDenseResult) -> Rows:
        # after _prompt's set_image of this very array: SAM does not embed it again
        cfg = self.cfg.sam_auto
        return auto_job(self.segmenter, image, clip, self.vocabulary, cfg, self.fps[AUTO])

    def prefetch(self, shard: int, spec: dict[str, str]) -> None:
        self.upstream.prefetch("clip_dense", spec["clip_dense"], shard, then=self._start_images)

    def _start_images(self, clip: pa.Table) -> None:
        """Start reading the images SAM will run on (those with a present class)."""
        uris, present = clip.column("image_uri").to_pylist(), clip.column("present").to_pylist()
        self.images.start(u for u, p in zip(uris, present, strict=True) if p)

    def process(self, shard: int, spec: dict[str, str]) -> list[tuple[pa.Table, pa.Table]]:
        segmenters = [(s, {PROMPT: self._prompt, AUTO: self._auto}[s]) for s in self.fps]
        rows: dict[str, list[dict[str, Any]]] = {stage: [] for stage in self.fps}
        errors: dict[str, list[dict[str, Any]]] = {stage: [] for stage in self.fps}

        def done(key: tuple[str, Any], job: Future[list[dict[str, Any]]]) -> None:
            stage, clip = key
            try:
                rows[stage] += job.result()
            except Exception as err:  # this image's failure, not the shard's
                errors[stage].append(error_from(err, clip.image_id, clip.image_uri, stage))

        todo = []
        for row in self.upstream.read("clip_dense", spec["clip_dense"], shard).to_pylist():
            clip = result_from_row(row)
            if len(clip.present):
                todo.append(clip)
                continue
            why = ABSENT["clip_dense"]
            for stage in self.fps:  # SAM is not run on images without a class to label
                errors[stage].append(
                    error_row(clip.image_id, clip.image_uri, stage, "no_class_present", why)
                )
        post = InOrder(self.post, done, POST_AHEAD * len(segmenters))
        for clip, image, exc in self.images.each(todo, lambda c: c.image_uri):
            for stage, segment in segmenters:
                try:
                    if exc is not None:
                        raise exc
                    assert image is not None
                    self._check_memory(stage, image, clip)
                    post.submit((stage, clip), segment(image, clip))
                except Exception as err:
                    post.failed((stage, clip), err)
        post.drain()
        return [
            (MaskRecords.from_rows(rows[stage]).table, errors_table(errors[stage]))
            for stage in self.fps
        ]


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
