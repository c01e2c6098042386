"""Stage `merge` (METHOD "Merge"): all stage-1.1 masks plus a seeded sample of stage-1.2 masks.

Sampling is per image, with a generator seeded by ``(cfg.seed, a hash of image_id)``, so an
image's sample does not depend on which shard it landed in, on the other images, or on the
order SAM returned its masks (they are put in a canonical order before sampling). Each
image keeps ``round(auto_fraction * n)`` of its ``n`` automatic masks (halves round up).

Records keep the ``fingerprint`` of the stage that made them, so a merged mask points to its
origin. Consumers compose label maps from merged records
(:func:`fmbseg.storage.records.compose_label_map`), painting masks in ``merge.order``, which
the merge manifest records (:func:`merge_order`) so that every consumer paints alike:

- ``area`` (default, ours): masks are painted in descending area, so a small mask wins a
  pixel over a larger one whatever its stage; a small stage-1.2 mask (sampled, labelled only
  by the mean CLIP similarity under it) can overwrite part of a stage-1.1 mask.
- ``prompt_first``: stage-1.1 masks (CLIP points -> SAM) are painted over all stage-1.2
  masks; the area order holds within each stage.
- ``fill_unlabelled``: stage-1.1 masks first (area order among them), then stage-1.2 masks
  only fill pixels no mask has labelled, the highest predicted IoU first; a stage-1.2 mask
  never overwrites any label.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fmbseg.config import MergeConfig
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import (
    ERROR_SCHEMA,
    MaskRecords,
    error_row,
    errors_table,
    rows_by_image,
)
from fmbseg.tasks.annotate.common import (
    ABSENT,
    INDEX_STAGE,
    VOCABULARY_KEY,
    Upstream,
    loader_pool,
    read_vocabulary,
)

STAGE = "merge"
ORDER_KEY = "order"  # manifest meta key holding merge.order


def merge_order(store: ArtifactStore, merge_fp: str) -> str:
    """The ``merge.order`` a committed merge output was made with: its label maps are
    painted that way (``"area"`` for outputs made before the option existed)."""
    return str(store.require_manifest(STAGE, merge_fp).meta.get(ORDER_KEY, "area"))


def image_seed(seed: int, image_id: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``image_id`` (not Python's salted hash)."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def sample_count(n: int, fraction: float) -> int:
    """``round(fraction * n)`` with halves rounded up, within ``[0, n]``."""
    return min(n, max(0, int(np.floor(fraction * n + 0.5))))


def _canonical(areas: Sequence[int], rles: Sequence[bytes], cats: Sequence[int]) -> np.ndarray:
    """Row order by (area descending, RLE bytes, category id): independent of input order."""
    keys = list(zip(areas, rles, cats, strict=True))
    return np.array(
        sorted(range(len(keys)), key=lambda i: (-keys[i][0], keys[i][1], keys[i][2])),
        dtype=np.int64,
    )


def _sampled(
    areas: Sequence[int],
    rles: Sequence[bytes],
    cats: Sequence[int],
    image_id: str,
    cfg: MergeConfig,
) -> np.ndarray | None:
    """Positions (ascending) of the automatic masks ONE image keeps; None = all of them."""
    n = len(areas)
    k = sample_count(n, cfg.auto_fraction)
    if k == n:
        return None
    order = _canonical(areas, rles, cats)
    return np.sort(image_seed(cfg.seed, image_id).permutation(order)[:k])


def sample_auto(auto: MaskRecords, image_id: str, cfg: MergeConfig) -> MaskRecords:
    """The sampled automatic masks of ONE image (``auto`` holds only that image's records)."""
    t = auto.table
    chosen = _sampled(
        t.column("area").to_pylist(),
        t.column("rle_counts").to_pylist(),
        t.column("category_id").to_pylist(),
        image_id,
        cfg,
    )
    return auto if chosen is None else MaskRecords.derived(t.take(pa.array(chosen)))


def merge_image(
    prompt: MaskRecords, auto: MaskRecords, image_id: str, cfg: MergeConfig
) -> MaskRecords:
    """Merged records of ONE image: every prompt mask, then the sampled automatic masks."""
    return MaskRecords.concat([prompt, sample_auto(auto, image_id, cfg)])


def merge_shard(
    images: Sequence[Mapping[str, object]],
    prompt: MaskRecords,
    auto: MaskRecords,
    cfg: MergeConfig,
    upstream_errors: pa.Table | None = None,
    absent: str = ABSENT["clip_dense"],
) -> tuple[MaskRecords, pa.Table]:
    """Merge the records of a shard's images; a reason for every image left without masks.

    The records equal :func:`merge_image` of each image in ``images`` order, concatenated,
    from one ``take`` over the shard's tables (no per-image tables to build and validate).

    Args:
        images: one mapping per image with ``image_id``, ``image_uri`` and ``present`` (the
            class ids clip_dense found), in output order.
        prompt, auto: the records of the sam_prompt and sam_auto stages for those images.
        upstream_errors: rows (``ERROR_SCHEMA``) the earlier stages recorded; an image
            without masks gets its first upstream reason, else ``no_class_present`` when
            no class was present (``absent`` says why), else ``no_masks``.

    Returns (records, errors with ``stage="merge"``).
    """
    earlier: dict[str, dict] = {}
    if upstream_errors is not None and upstream_errors.num_rows:
        for row in upstream_errors.to_pylist():
            earlier.setdefault(row["image_id"], row)
    # One take over [prompt rows; auto rows] for the whole shard: the rows of each image in
    # order, its prompt masks then its sampled automatic masks (what merge_image gives).
    by_image_p = rows_by_image(prompt.table)
    by_image_a = rows_by_image(auto.table)
    a = auto.table
    areas, rles, cats = (a.column(n).to_pylist() for n in ("area", "rle_counts", "category_id"))
    offset = len(prompt)
    take: list[int] = []
    errors = []
    for image in images:
        image_id, uri = str(image["image_id"]), str(image["image_uri"])
        rows = list(by_image_p.get(image_id, ()))
        autos = by_image_a.get(image_id, [])
        if autos:
            chosen = _sampled(
                [areas[i] for i in autos],
                [rles[i] for i in autos],
                [cats[i] for i in autos],
                image_id,
                cfg,
            )
            kept = autos if chosen is None else [autos[j] for j in chosen]
            rows += [offset + i for i in kept]
        if rows:
            take += rows
            continue
        if image_id in earlier:
            e = earlier[image_id]
            why = e["error_type"], f"{e['stage']}: {e['message']}"
        elif not len(image["present"]):  # type: ignore[arg-type]
            why = "no_class_present", absent
        else:
            why = "no_masks", "classes were present but SAM returned no usable mask"
        errors.append(error_row(image_id, uri, STAGE, *why))
    if not take:
        return MaskRecords.empty(), errors_table(errors)
    both = pa.concat_tables([prompt.table, a]).unify_dictionaries().combine_chunks()
    return MaskRecords.derived(both.take(pa.array(take, type=pa.int64()))), errors_table(errors)


# ---- shell ---------------------------------------------------------------------------------


INDEX_COLUMNS = ("image_id", "uri")
CLIP_COLUMNS = ("image_id", "present")  # not the similarity maps


class MergeWorker:
    """Shard worker of merge: no model. A spec maps ``index`` and the teacher's stages to
    fingerprints -- ``clip_dense``, ``sam_prompt`` and ``sam_auto`` (CLIP + SAM), or
    ``sam3`` (SAM 3, whose masks take the prompt masks' place; there are no automatic
    ones) -- and shard ``i`` of each is read."""

    def __init__(self, store: ArtifactStore, cfg: MergeConfig) -> None:
        self.store, self.cfg = store, cfg
        self.upstream = Upstream(store, loader_pool(2))

    def prefetch(self, shard: int, spec: dict[str, str]) -> None:
        up = self.upstream
        up.prefetch(INDEX_STAGE, spec["index"], shard, columns=INDEX_COLUMNS)
        for stage in (s for s in spec if s != INDEX_STAGE):
            columns = CLIP_COLUMNS if stage == "clip_dense" else None
            up.prefetch(stage, spec[stage], shard, columns=columns)
            up.prefetch(stage, spec[stage], shard, kind="errors")

    def process(self, shard: int, spec: dict[str, str]) -> tuple[pa.Table, pa.Table]:
        up = self.upstream
        index = up.read(INDEX_STAGE, spec["index"], shard, columns=INDEX_COLUMNS).to_pylist()
        present: dict[str, list[int]] = {}
        if "clip_dense" in spec:
            clip = up.part("clip_dense", spec["clip_dense"], shard, columns=CLIP_COLUMNS)
            if clip is not None:
                ids, classes = clip.column("image_id").to_pylist(), clip["present"].to_pylist()
                present = dict(zip(ids, classes, strict=True))
        images = [
            {
                "image_id": r["image_id"],
                "image_uri": r["uri"],
                "present": present.get(r["image_id"], []),
            }
            for r in index
        ]

        def masks(stage: str) -> MaskRecords:  # none when the teacher has no such stage
            part = up.part(stage, spec[stage], shard) if stage in spec else None
            return MaskRecords.empty() if part is None else MaskRecords.derived(part)

        teacher = "sam3" if "sam3" in spec else "clip_dense"
        # SAM 3's masks take the prompt masks' place; it has no automatic ones
        prompt = masks("sam3" if teacher == "sam3" else "sam_prompt")
        auto = masks("sam_auto")
        upstream = []
        for stage in (s for s in spec if s != INDEX_STAGE):
            errors = up.part(stage, spec[stage], shard, kind="errors")
            if errors is not None:
                upstream.append(errors.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA))
        # a SAM stage's "no_class_present" row is the same reason merge gives itself
        merged, errors = merge_shard(
            images, prompt, auto, self.cfg, _real_failures(upstream), ABSENT[teacher]
        )
        return merged.table, errors


def _real_failures(tables: list[pa.Table]) -> pa.Table | None:
    if not tables:
        return None
    t = pa.concat_tables(tables)
    return t.filter(pc.not_equal(t.column("error_type"), "no_class_present"))


def prepare(job: StageRun) -> Prepared:
    """merge of the committed outputs of the teacher's stages (the stage's inputs: CLIP +
    the SAM pair, or SAM 3), shard by index shard."""
    inputs = {s: fp for s, fp in job.fps.items() if s not in job.targets}
    labeller = "sam3" if "sam3" in inputs else "clip_dense"  # where the vocabulary is
    vocabulary = read_vocabulary(job.store.require_manifest(labeller, inputs[labeller]))
    specs = [inputs] * job.store.require_manifest(INDEX_STAGE, inputs[INDEX_STAGE]).num_shards
    factory = functools.partial(MergeWorker, job.store, job.cfg.merge)
    meta = {VOCABULARY_KEY: list(vocabulary), ORDER_KEY: job.cfg.merge.order, **inputs}
    return Prepared(specs, factory, meta)
