"""Flow ``annotate``: stage 1 of METHOD.md, images + class names -> pseudo-labels.

index -> clip_dense -> sam_prompt | sam_auto -> merge -> export: the stages declared in
:mod:`fmbseg.tasks.annotate.stages`, each pass one Prefect task cached by its fingerprints
(a changed SAM threshold reruns sam_auto, merge and export; nothing else); the two SAM
stages share one task and one pass over the images. Each pass fans out over the index's
shards on Ray (:mod:`fmbseg.engine`).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from prefect import flow

from fmbseg.config import Config
from fmbseg.data.image_labels import ImageLabels, load_image_labels
from fmbseg.data.sources import source_root
from fmbseg.data.vocab import MAX_LABEL_CLASSES, resolve_vocabulary
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    configure,
    flow_lineage,
    image_markdown,
    manifest_artifact,
    markdown_artifact,
    open_store,
    pass_task,
    summary_rows,
    table_artifact,
)
from fmbseg.flows.index import index_listing, list_images_task
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.export_coco import NO_LABEL
from fmbseg.tasks.annotate.index import count_errors
from fmbseg.tasks.annotate.stages import check_teacher, passes, stage1, stage_run


@dataclass(frozen=True, kw_only=True)
class AnnotationSummary:
    """What an annotate run made, for people: counts, errors and where the outputs are.

    The masks per SAM source default to 0 and ``errors`` names only the stages that ran
    and failed somewhere, so a teacher without a prompt or automatic SAM stage still fits.
    """

    images_indexed: int  # rows of the index (images listed and read)
    skipped_extensions: dict[str, int]  # files a folder walk left out, by extension
    images_with_masks: int  # images the export labelled
    images_no_label: int  # images with no confident label (not failures)
    images_failed: int  # images a stage failed on
    masks_prompt: int = 0  # merged masks from class-prompted SAM (0: no such stage ran)
    masks_auto: int = 0  # merged masks from SAM's automatic generator (0: no such stage ran)
    masks_sam3: int = 0  # merged masks from SAM 3's text concepts (models.teacher: sam3)
    classes_found: dict[str, int]  # masks per class name, most first
    errors: dict[str, dict[str, int]]  # {stage: {error type: count}}, stages with errors only
    first_errors: list[dict[str, Any]]  # the first failing files: uri, error_type, message
    export: str  # URI of the export folder (label PNGs under labels/)
    gallery: str | None  # URI of gallery.html, None when the export wrote none
    coco: str  # URI of the COCO RLE annotations JSON
    errors_table: str  # URI of the Parquet table of every failure

    def rows(self) -> list[dict[str, Any]]:
        """The ``annotate-summary`` table: one row per field, in order."""
        return summary_rows({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class AnnotateResult:
    """What :func:`annotate_flow` returns."""

    fingerprints: dict[str, str]  # {stage: fingerprint} of every stage run or reused
    summary: AnnotationSummary  # counts and output locations


def annotation_summary(store: ArtifactStore, fps: dict[str, str]) -> AnnotationSummary:
    """The :class:`AnnotationSummary` of the committed stages ``fps``.

    Streams the merge output one shard at a time, so the driver's memory does not grow with
    the number of images.
    """
    sources: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    for table in store.iter_shards("merge", fps["merge"]):
        part = table.select(["source", "category"]).to_pydict()
        sources.update(str(s) for s in part["source"])
        classes.update(part["category"])
    index = store.require_manifest("index", fps["index"])
    # "no class found" / "no usable mask" rows (SAM stages, merge) are results, not failures
    errors = {
        stage: {
            k: n for k, n in count_errors(store, stage, fps[stage]).items() if k not in NO_LABEL
        }
        for stage in fps
        if stage != "export"  # export's failures are the union of these, in errors.parquet
    }
    base = f"exports/{fps['export']}"
    export = store.read_json(f"{base}/export.json")
    return AnnotationSummary(
        images_indexed=index.rows,
        skipped_extensions=index.meta.get("skipped_extensions", {}),
        images_with_masks=export["labelled_images"],
        images_no_label=export["no_confident_label"],
        images_failed=export["failed_images"],
        masks_prompt=sources["prompt"],
        masks_auto=sources["auto"],
        masks_sam3=sources["sam3"],
        classes_found=dict(classes.most_common()),
        errors={stage: counts for stage, counts in errors.items() if counts},
        first_errors=export["first_errors"],
        export=store.url(base),
        gallery=store.url(f"{base}/gallery.html") if export["files"].get("gallery") else None,
        coco=store.url(f"{base}/annotations.json"),
        errors_table=store.url(f"{base}/errors.parquet"),
    )


def label_index(
    st: ArtifactStore,
    cfg: Config,
    index_fp: str,
    vocabulary: tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
    image_labels: ImageLabels | None = None,
) -> dict[str, str]:
    """Every stage after ``index`` on the committed index ``index_fp``; returns {stage: fp}.

    ``image_labels``: image-level tags that replace CLIP's presence vote."""
    job = stage_run(
        st, cfg, index_fp, vocabulary, storage_options=storage_options, image_labels=image_labels
    )
    for stages in passes(stage1(cfg)):  # each pass one Prefect task, cached by its fps
        pass_task(stages)(job)
    fps = dict(job.fps)
    for stage, fp in fps.items():
        if stage != "export":
            manifest_artifact(st, stage, fp)
    return fps


# Overlays shown in the run's gallery artifact, shrunk to this long side: the artifact lives
# in Prefect's database, so it stays small (a few tens of kB).
ARTIFACT_THUMBNAILS = 4
ARTIFACT_THUMB_SIDE = 240


def gallery_markdown(store: ArtifactStore, export_fp: str, limit: int = ARTIFACT_THUMBNAILS) -> str:
    """Markdown with the first ``limit`` overlays of an export embedded as images (see
    :func:`~fmbseg.flows.common.image_markdown`) and where the full gallery is."""
    from PIL import Image

    from fmbseg.tasks.annotate.gallery import jpeg

    base = f"exports/{export_fp}"
    names = [n for n in store.ls(f"{base}/overlays") if n.endswith(".jpg")][:limit]
    lines = [f"### Pseudo-labels {export_fp}", ""]
    for name in names:
        thumb = f"{base}/thumbs/{name}"
        data = store.read_bytes(thumb if store.exists(thumb) else f"{base}/overlays/{name}")
        small = jpeg(
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), ARTIFACT_THUMB_SIDE, quality=80
        )
        lines += [f"**{name[:-4]}**", "", image_markdown(name[:-4], small, "image/jpeg"), ""]
    if not names:
        lines += ["(no overlays: `export.overlays` is off or no image was labelled)", ""]
    gallery = f"{base}/gallery.html"
    if store.exists(gallery):
        lines.append(f"Full gallery: `{store.url(gallery)}`")
    return "\n".join(lines)


@flow(name="annotate", **LINEAGE_HOOKS)
def annotate_flow(
    images: str,
    store: str = "./fmbseg-store",
    classes: str | list[str] | None = None,
    vocab: str | None = None,
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    image_labels: str | None = None,
) -> AnnotateResult:
    """Pseudo-label ``images`` for ``classes`` (or a built-in ``vocab``) into ``store``.

    ``image_labels``: a file of image-level tags (COCO JSON, Parquet or CSV; see
    :mod:`fmbseg.data.image_labels`) whose classes replace CLIP's presence vote; its names
    must be vocabulary classes (checked before any work).
    """
    # bad names fail before any work, more classes than a label map holds included
    vocabulary = resolve_vocabulary(classes, vocab, max_names=MAX_LABEL_CLASSES)
    tags = None
    if image_labels is not None:  # so do unknown tag names
        tags = load_image_labels(image_labels, vocabulary, storage_options)
        tags = tags.bound_to(source_root(images, image_root))
    cfg = configure(config, overrides, ray_address)
    # seconds, not after index: the teacher's package and weights
    check_teacher(cfg, image_labels, storage_options=storage_options)
    st = open_store(store, storage_options)
    listing = list_images_task(images, cfg, storage_options, image_root, st.uri)
    index_fp = index_listing(st, cfg, listing, storage_options)
    fps = label_index(st, cfg, index_fp, vocabulary, storage_options, tags)
    summary = annotation_summary(st, fps)
    table_artifact(
        "annotate-summary",
        summary.rows(),
        description="pseudo-labels: images, masks per source, classes, errors, outputs",
    )
    markdown_artifact(
        "annotate-gallery",
        gallery_markdown(st, fps["export"]),
        description="a few pseudo-labelled images (overlays) and the gallery's location",
    )
    flow_lineage(
        st,
        "annotate",
        images=images,
        vocabulary=list(vocabulary),
        image_labels=image_labels,
        config=cfg.to_dict(),
        stages=fps,
    )
    return AnnotateResult(fps, summary)
