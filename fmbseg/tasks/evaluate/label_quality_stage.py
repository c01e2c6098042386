"""Stage ``label_quality``: stage-1 pseudo-labels of a benchmark's images vs. its ground truth.

The annotate flow must have run on (a superset of) the split's image files, from any
location: a pseudo-label record finds its benchmark sample through the image's content hash
(the index's ``image_id``), not its path. Each shard of the split runs
:func:`fmbseg.tasks.evaluate.label_quality.pseudo_label_quality` on its samples and stores the three
confusion matrices (prompt-only / stage 1.1, auto-only / stage 1.2, merged); the flow sums
them exactly.

Output shard records (one row per shard, :data:`RECORD_SCHEMA`): ``shard``, ``images``,
``without_records`` [int32], ``unmatched`` [string, JSON list of record categories that are
no dataset class], ``prompt`` / ``auto`` / ``merged`` [string, JSON of
``ConfusionMatrix.to_dict()``] and ``masks`` [int64, the merge records of the shard's images].

Several merge outputs of the same images (one per teacher, ``models.sam``) are compared with
:func:`compare_teachers`: each one's report with its teacher (:func:`teacher_of`, from its
SAM stages' manifests) side by side.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fmbseg.data.datasets import SegDataset, dataset_description
from fmbseg.engine.runner import TIMING_KEY
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage.fingerprint import check_fingerprint, content_hash, fingerprint
from fmbseg.storage.store import ArtifactStore, NotCommittedError
from fmbseg.tasks.annotate.common import TEACHER_KEY
from fmbseg.tasks.annotate.merge import merge_order
from fmbseg.tasks.evaluate.label_quality import VARIANTS, pseudo_label_quality, quality_report
from fmbseg.tasks.evaluate.metrics import ConfusionMatrix
from fmbseg.tasks.evaluate.stage import prepare_split

STAGE = "label_quality"
CODE_VERSION = "2"  # 2: masks per shard
MERGE_STAGE = "merge"
SAM_STAGES = ("sam_prompt", "sam_auto")
RECORD_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32()),
        pa.field("images", pa.int32()),
        pa.field("without_records", pa.int32()),
        pa.field("unmatched", pa.string()),
    ]
    + [pa.field(v, pa.string()) for v in VARIANTS]
    + [pa.field("masks", pa.int64())]
)


@dataclass(frozen=True)
class LabelsPlan:
    """What the user chose (``StageRun.given``; the merge output scored is the stage's
    input): the split (``limit`` applied) and, for each pseudo-labelled ``image_id``, the
    merge shards holding its records (:func:`locate_records`), so a worker reads only the
    shards its images need."""

    dataset: SegDataset
    data_root: str
    limit: int | None
    locations: dict[str, tuple[int, ...]]


def resolve_labels(store: ArtifactStore, ref: str) -> str:
    """``"latest"`` or a merge fingerprint -> a committed merge fingerprint."""
    if ref == "latest":
        fp = store.latest(MERGE_STAGE)
        if fp is None:
            raise NotCommittedError(
                f"no committed pseudo-labels (stage {MERGE_STAGE}) in {store.uri}; "
                "run `fmbseg annotate` on the dataset's images first"
            )
        return fp
    store.require_manifest(MERGE_STAGE, check_fingerprint(ref, "labels"))
    return ref


def locate_records(store: ArtifactStore, merge_fp: str) -> dict[str, tuple[int, ...]]:
    """``image_id`` -> the shards of merge output ``merge_fp`` holding its records."""
    where: dict[str, set[int]] = defaultdict(set)
    for shard in range(store.require_manifest(MERGE_STAGE, merge_fp).num_shards):
        table = store.read_shard(MERGE_STAGE, merge_fp, shard)
        if table.num_columns:
            for image_id in pc.unique(table["image_id"]).to_pylist():
                where[image_id].add(shard)
    return {k: tuple(sorted(v)) for k, v in where.items()}


class LabelQualityWorker:
    """Shard worker: hashes its images, reads their records, scores the three label maps.

    A spec is ``{"start": i, "stop": j}`` into the plan's samples.
    """

    def __init__(self, store: ArtifactStore, plan: LabelsPlan, merge_fp: str) -> None:
        self.store, self.plan, self.merge_fp = store, plan, merge_fp
        self.order = merge_order(store, merge_fp)

    def records(self, part: SegDataset) -> dict[str, pa.Table]:
        """Sample id -> that image's merge records (images without records are absent)."""
        by_hash: dict[str, list[str]] = defaultdict(list)
        for sample in part.samples:
            by_hash[content_hash(part._read(sample.image))].append(sample.sample_id)
        shards = sorted({s for h in by_hash for s in self.plan.locations.get(h, ())})
        wanted = pa.array(list(by_hash), pa.string())
        tables = []
        for shard in shards:
            t = self.store.read_shard(MERGE_STAGE, self.merge_fp, shard)
            tables.append(t.filter(pc.is_in(t["image_id"], value_set=wanted)))
        out: dict[str, pa.Table] = {}
        if not tables:
            return out
        found = pa.concat_tables(tables)
        for image_id in pc.unique(found["image_id"]).to_pylist():
            rows = found.filter(pc.equal(found["image_id"], image_id))
            for sid in by_hash[image_id]:
                out[sid] = rows
        return out

    def process(self, shard: int, spec: dict[str, int]) -> tuple[pa.Table, None]:
        part = self.plan.dataset.subset(range(spec["start"], spec["stop"]))
        records = self.records(part)
        q = pseudo_label_quality(part, records, order=self.order)
        row = {
            "shard": shard,
            "images": q["num_images"],
            "masks": sum(t.num_rows for t in records.values()),
            "without_records": q["images_without_records"],
            "unmatched": json.dumps(q["unmatched_categories"]),
            **{v: json.dumps(q[v]["confusion"]) for v in VARIANTS},
        }
        return pa.Table.from_pylist([row], schema=RECORD_SCHEMA), None


def prepare(job: StageRun) -> Prepared:
    """The scoring of ``job.given`` (a :class:`LabelsPlan`) against the committed merge
    output ``job.fp("merge")``, shard by shard of the split."""
    plan: LabelsPlan = job.given
    merge_fp = job.fp(MERGE_STAGE)
    worker = functools.partial(LabelQualityWorker, job.store, plan, merge_fp)
    return prepare_split(plan, job.cfg, worker, merge=merge_fp)


def build_label_report(job: StageRun) -> dict[str, Any]:
    """The summed matrices of the committed label-quality run ``job`` -> ``{"dataset",
    "data_root", "limit", "model" ("labels:{fp}"), "labels" (merge fp), "merge_order" (its
    ``merge.order``), "fingerprint", "num_images", "images_without_records",
    "unmatched_categories", "masks" (merge records of the scored images),
    "masks_per_image", "teacher" (:func:`teacher_of`), "prompt", "auto", "merged"}``; each
    variant as :func:`~fmbseg.tasks.evaluate.label_quality.quality_report` (mIoU,
    coverage, precision, ...).

    Raises:
        NotCommittedError: none of the split's images has pseudo-labels in the merge output
            (they were never annotated): a table of zeros would say nothing.
    """
    plan: LabelsPlan = job.given
    store, fp, merge_fp, ds = job.store, job.fp(STAGE), job.fp(MERGE_STAGE), plan.dataset
    cms = {v: ConfusionMatrix(len(ds.classes), ds.ignore_index) for v in VARIANTS}
    images = without = masks = 0
    unmatched: set[str] = set()
    for table in store.iter_shards(STAGE, fp):
        for row in table.to_pylist():
            images += row["images"]
            masks += row["masks"]
            without += row["without_records"]
            unmatched.update(json.loads(row["unmatched"]))
            for v in VARIANTS:
                cms[v].merge(ConfusionMatrix.from_dict(json.loads(row[v])))
    if images and without == images:
        raise NotCommittedError(
            f"none of the {images} images of {ds.name} in {plan.data_root} has pseudo-labels "
            f"in merge output {merge_fp}: annotate them first (fmbseg annotate --images "
            f"<the split's image folder> --vocab ...), then evaluate labels:latest"
        )
    return {
        "dataset": ds.name,
        "dataset_description": dataset_description(ds.name),
        "data_root": plan.data_root,
        "limit": plan.limit,
        "model": f"labels:{merge_fp}",
        "labels": merge_fp,
        "merge_order": merge_order(store, merge_fp),
        "fingerprint": fp,
        "num_images": images,
        "images_without_records": without,
        "unmatched_categories": sorted(unmatched),
        "masks": masks,
        "masks_per_image": masks / images if images else None,
        "teacher": teacher_of(store, merge_fp),
        **{v: quality_report(cms[v], ds.classes) for v in VARIANTS},
    }


def teacher_of(store: ArtifactStore, merge_fp: str) -> dict[str, Any]:
    """The teacher of a merge output, from its SAM stages' manifests (what annotate recorded;
    the sam3 stage's for the SAM 3 teacher).

    Returns ``{"sam", "sam_weights", "sam_precision"}`` (``models.*`` of the SAM stages;
    ``None`` when not recorded), ``"images"`` (images through the SAM pass: the clip_dense
    rows), ``"sam_seconds"`` (wall time of the SAM pass(es) making ``sam_prompt`` and
    ``sam_auto``, model loading included), ``"images_per_second"`` and ``"unavailable"``:
    why a figure is ``None`` (``None`` when all are there). A figure is never guessed: a
    resumed run's wall time covers only part of the images, so it gives none.
    """
    keys = ("sam", "sam_weights", "sam_precision", "images", "sam_seconds")
    out: dict[str, Any] = dict.fromkeys((*keys, "images_per_second", "unavailable"))
    meta = store.require_manifest(MERGE_STAGE, merge_fp).meta
    if meta.get("sam3"):
        return _sam3_teacher(store, str(meta["sam3"]), out)
    if not all(meta.get(s) for s in SAM_STAGES):
        return {**out, "unavailable": "the merge output names no SAM stages"}
    manifests = {s: store.manifest(s, meta[s]) for s in SAM_STAGES}
    missing = [f"{s}/{meta[s]}" for s, m in manifests.items() if m is None]
    if missing:
        return {**out, "unavailable": f"{', '.join(missing)} not in this store"}
    metas = {s: m.meta for s, m in manifests.items() if m is not None}
    models = metas["sam_prompt"].get(TEACHER_KEY) or metas["sam_auto"].get(TEACHER_KEY)
    if models is None:
        return {**out, "unavailable": "teacher not recorded (SAM stages made before it was)"}
    out.update({k: models.get(k) for k in ("sam", "sam_weights", "sam_precision")})
    clip = store.manifest("clip_dense", str(metas["sam_prompt"].get("clip_dense")))
    out["images"] = None if clip is None else clip.rows
    recorded = [metas[s].get(TIMING_KEY) for s in SAM_STAGES]
    timings: list[dict[str, Any]] = [t for t in recorded if t is not None]
    if len(timings) < len(recorded):
        return {**out, "unavailable": "SAM wall time not recorded"}
    if any(t["shards_run"] < t["shards"] for t in timings):
        return {
            **out,
            "unavailable": "SAM stages resumed: their wall time covers part of the images",
        }
    prompt, auto = timings
    both = {s: meta[s] for s in SAM_STAGES}
    if prompt["outputs"] == auto["outputs"] == both:  # one pass made both (sam_pair)
        seconds = prompt["wall_s"]
    elif all(t["outputs"] == {s: meta[s]} for t, s in zip(timings, SAM_STAGES, strict=True)):
        seconds = prompt["wall_s"] + auto["wall_s"]  # each stage ran alone
    else:  # e.g. sam_prompt made in one pass with another sam_auto output: its time is shared
        return {**out, "unavailable": "a SAM pass also made another output: its time is shared"}
    out["sam_seconds"] = seconds
    if out["images"] is None or seconds <= 0:
        return {**out, "unavailable": "images of the SAM pass unknown"}
    return {**out, "images_per_second": out["images"] / seconds}


def _sam3_teacher(store: ArtifactStore, sam3_fp: str, out: dict[str, Any]) -> dict[str, Any]:
    """:func:`teacher_of` for the SAM 3 teacher (``models.teacher: sam3``): ``sam`` holds
    ``models.sam3`` and ``sam_seconds`` the sam3 stage's wall time."""
    manifest = store.manifest("sam3", sam3_fp)
    if manifest is None:
        return {**out, "unavailable": f"sam3/{sam3_fp} not in this store"}
    models = manifest.meta.get(TEACHER_KEY) or {}
    out = {**out, "sam": models.get("sam3"), "sam_weights": models.get("sam3_weights")}
    index = store.manifest("index", str(manifest.meta.get("index")))
    out["images"] = None if index is None else index.rows
    timing = manifest.meta.get(TIMING_KEY)
    if timing is None:
        return {**out, "unavailable": "SAM 3 wall time not recorded"}
    if timing["shards_run"] < timing["shards"]:
        return {**out, "unavailable": "sam3 resumed: its wall time covers part of the images"}
    out["sam_seconds"] = timing["wall_s"]
    if out["images"] is None or timing["wall_s"] <= 0:
        return {**out, "unavailable": "images of the SAM 3 pass unknown"}
    return {**out, "images_per_second": out["images"] / timing["wall_s"]}


def comparison_fingerprint(reports: Sequence[dict[str, Any]]) -> str:
    """Of a teacher comparison: its label-quality fingerprints, in order."""
    return fingerprint(
        "compare_teachers", CODE_VERSION, {"label_quality": [r["fingerprint"] for r in reports]}
    )


def compare_teachers(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Label-quality reports of merge outputs of the same split -> one report with a row per
    teacher: ``{"dataset", "num_images", "fingerprint", "teachers": [{"labels", "teacher"
    (``models.sam`` or ``None``), "mIoU", "coverage", "precision" (merged labels),
    "masks_per_image", "images_per_second", "unavailable"}], "reports": [each report]}``.

    Raises:
        ValueError: the reports are of different datasets or splits (``limit``).
    """
    first = reports[0]
    if len({(r["dataset"], r["data_root"], r["num_images"]) for r in reports}) > 1:
        raise ValueError("compare_teachers: the reports score different splits")
    rows = [
        {
            "labels": r["labels"],
            "teacher": r["teacher"]["sam"],
            "mIoU": r["merged"]["mIoU"],
            "coverage": r["merged"]["coverage"],
            "precision": r["merged"]["precision"],
            "masks_per_image": r["masks_per_image"],
            "images_per_second": r["teacher"]["images_per_second"],
            "unavailable": r["teacher"]["unavailable"],
        }
        for r in reports
    ]
    return {
        "dataset": first["dataset"],
        "dataset_description": first.get("dataset_description"),
        "data_root": first["data_root"],
        "limit": first["limit"],
        "num_images": first["num_images"],
        "fingerprint": comparison_fingerprint(reports),
        "model": ",".join(r["model"] for r in reports),
        "teachers": rows,
        "reports": list(reports),
    }
