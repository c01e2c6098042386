"""Flow ``evaluate``: mIoU of a model on a benchmark split (METHOD "Evaluation").

plan (open the split, resolve the model, fingerprint) -> stage ``evaluate`` (shards of the
split on Ray, one confusion matrix per shard) -> exact merge -> report JSON in the store,
artifacts, lineage. The stage (declared in :mod:`fmbseg.tasks.evaluate.stages`, like
``label_quality``) is cached by its fingerprint, so evaluating the same model on the same
split again reads the committed shard matrices instead of running the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Self

from prefect import flow, task

from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    PLANNING_TASK,
    configure,
    flow_lineage,
    manifest_artifact,
    markdown_artifact,
    open_store,
    pass_task,
    table_artifact,
)
from fmbseg.tasks.evaluate.label_quality import VARIANTS
from fmbseg.tasks.evaluate.label_quality_stage import build_label_report, compare_teachers
from fmbseg.tasks.evaluate.stage import build_report, write_evaluation, write_report
from fmbseg.tasks.evaluate.stages import (
    EVALUATE,
    LABEL_QUALITY,
    plan_evaluation,
    plan_label_quality,
)

LABELS_PREFIX = "labels:"


@dataclass(frozen=True)
class _Report:
    """A report as written to the store: ``json`` (every key) and ``report_uris``, plus a
    field per report key that callers read."""

    @classmethod
    def from_json(cls, report: dict[str, Any], uris: Sequence[str], **given: Any) -> Self:
        """Each field but those ``given`` taken from the report key of its name; ``json``
        = ``report``, ``report_uris`` = where it was written."""
        names = {f.name for f in fields(cls)} - {"json", "report_uris", *given}
        values = {n: report[n] for n in names} | given
        return cls(**values | {"json": report, "report_uris": tuple(uris)})


@dataclass(frozen=True)
class EvaluationReport(_Report):
    """What :func:`evaluate_flow` returns for a model or a baseline: the report written to
    the store (:func:`~fmbseg.tasks.evaluate.stage.build_report`) and where it was written."""

    model: str  # what was evaluated, as people name it: ``maskclip``, ``name:version``
    model_ref: dict[str, Any]  # its identity (kind, names, weights; ``uri`` of a registry one)
    dataset: str  # the benchmark split's name, e.g. ``voc21``
    fingerprint: str  # of the evaluate stage
    num_images: int  # images evaluated
    images_failed: int  # images of the split that could not be read
    mIoU: float | None  # mean IoU over the classes present (fraction; None: none present)
    mAcc: float | None  # mean per-class pixel accuracy (fraction)
    aAcc: float | None  # pixel accuracy over all evaluated pixels (fraction)
    per_class: list[dict[str, Any]]  # one ``{"class", "IoU", "Acc", "pixels"}`` per class
    confusion: dict[str, Any]  # the merged confusion matrix (``ConfusionMatrix.to_dict``)
    json: dict[str, Any]  # the report JSON exactly as written to the store, every key
    report_uris: tuple[str, ...]  # where that JSON was written, the main copy first

    def table_row(self) -> dict[str, Any]:
        """The ``evaluate-results`` table's row."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "mIoU": self.mIoU,
            "pixel_acc": self.aAcc,
            "images": self.num_images,
            "report": self.report_uris[0],
        }


@dataclass(frozen=True)
class LabelQualityReport(_Report):
    """What :func:`label_quality_flow` returns: stage-1 pseudo-labels scored against the
    split's ground truth (:func:`~fmbseg.tasks.evaluate.label_quality_stage.
    build_label_report`), as written to the store."""

    model: str  # ``labels:{merge fp}``
    labels: str  # the merge fingerprint scored
    dataset: str  # the split's name
    fingerprint: str  # of the label_quality stage
    num_images: int  # images of the split scored
    images_without_records: int  # of those, images the merge output has no records for
    unmatched_categories: list[str]  # label class names that are no class of the split
    masks_per_image: float | None  # merge records per scored image (None: no image)
    teacher: dict[str, Any]  # ``models.sam`` of the SAM stages, their speed (or why unknown)
    prompt: dict[str, Any]  # prompt-only labels: mIoU, aAcc, coverage, precision, per_class
    auto: dict[str, Any]  # automatic-mask-only labels, the same figures
    merged: dict[str, Any]  # the merged labels (what training reads), the same figures
    json: dict[str, Any]  # the report JSON exactly as written to the store, every key
    report_uris: tuple[str, ...]  # where that JSON was written

    def variant(self, name: str) -> dict[str, Any]:
        """The figures of label map ``name``: ``prompt``, ``auto`` or ``merged``."""
        return {"prompt": self.prompt, "auto": self.auto, "merged": self.merged}[name]

    def with_uris(self) -> dict[str, Any]:
        """The JSON plus ``report_uris``: how a teacher comparison's JSON embeds the report."""
        return {**self.json, "report_uris": list(self.report_uris)}

    def table_rows(self) -> list[dict[str, Any]]:
        """The ``label-quality-results`` table: one row per label map."""
        return [
            {
                "dataset": self.dataset,
                "labels": v,
                "mIoU": self.variant(v)["mIoU"],
                "pixel_acc": self.variant(v)["aAcc"],
                "coverage": self.variant(v)["coverage"],
                "precision": self.variant(v)["precision"],
                "images": self.num_images,
            }
            for v in VARIANTS
        ]

    def merged_report(self) -> dict[str, Any]:
        """The merged labels' figures as a model report (for :func:`per_class_markdown`)."""
        return {
            **self.merged,
            "model": f"{self.model} (merged)",
            "dataset": self.dataset,
            "num_images": self.num_images,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class TeacherRow:
    """One merge output (one teacher) in a :class:`TeacherComparison`."""

    labels: str  # the merge fingerprint
    teacher: str | None  # its SAM stages' ``models.sam`` (None: not recorded)
    mIoU: float | None  # of its merged labels (fraction)
    coverage: float | None  # fraction of evaluated pixels its labels cover
    precision: float | None  # fraction of labelled pixels labelled correctly
    masks_per_image: float | None  # merge records per scored image
    images_per_second: float | None  # of its SAM pass (None: unavailable, see below)
    unavailable: str | None  # why a figure is None (None: all are there)


# the ``teacher-comparison`` table's columns
TEACHER_COLUMNS = (
    "labels",
    "teacher",
    "mIoU",
    "coverage",
    "masks_per_image",
    "images_per_second",
    "unavailable",
)


@dataclass(frozen=True)
class TeacherComparison(_Report):
    """What :func:`compare_teachers_flow` returns: several teachers' pseudo-labels of one
    split side by side (:func:`~fmbseg.tasks.evaluate.label_quality_stage.compare_teachers`)."""

    model: str  # ``labels:A,labels:B``: what was compared
    dataset: str  # the split's name
    fingerprint: str  # of the comparison (its label-quality fingerprints, in order)
    num_images: int  # images of the split scored
    teachers: tuple[TeacherRow, ...]  # one per merge output, in the order asked
    reports: tuple[LabelQualityReport, ...]  # each merge output's own report
    json: dict[str, Any]  # the comparison JSON exactly as written to the store, every key
    report_uris: tuple[str, ...]  # where that JSON was written

    def table_rows(self) -> list[dict[str, Any]]:
        """The ``teacher-comparison`` table: one row per teacher."""
        return [{k: getattr(r, k) for k in TEACHER_COLUMNS} for r in self.teachers]


def label_refs(model: str) -> list[str]:
    """``labels:A`` -> ``["A"]``; ``labels:A,labels:B`` -> ``["A", "B"]``: the merge outputs
    (one per teacher) whose pseudo-labels are scored, side by side when several.

    Raises:
        ValueError: a part of the list is not ``labels:<merge fingerprint>`` or ``labels:latest``.
    """
    parts = [p.strip() for p in model.split(",")]
    for part in parts:
        if not part.startswith(LABELS_PREFIX) or part == LABELS_PREFIX:
            raise ValueError(
                f"model {model!r}: {part!r} is not labels:<merge fingerprint> or labels:latest "
                "(only pseudo-labels are compared side by side: labels:A,labels:B)"
            )
    return [p[len(LABELS_PREFIX) :] for p in parts]


# planning lists the split's files, resolves the model or labels and fingerprints the stage
plan_evaluation_task = task(name="plan-evaluation", **PLANNING_TASK)(plan_evaluation)
plan_label_quality_task = task(name="plan-label-quality", **PLANNING_TASK)(plan_label_quality)


def _num(v: float | None, scale: float = 1.0) -> str:
    """``scale * v`` with two decimals (100: a percentage), ``-`` for None."""
    return "-" if v is None else f"{scale * v:.2f}"


def per_class_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table of per-class IoU / accuracy (percentages)."""
    lines = [
        f"# {report['model']} on {report['dataset']}",
        "",
        f"mIoU **{_num(report['mIoU'], 100)}**, mAcc {_num(report['mAcc'], 100)}, pixel accuracy "
        f"{_num(report['aAcc'], 100)} over {report['num_images']} images "
        f"(fingerprint `{report['fingerprint']}`).",
        "",
        "| class | IoU | Acc | pixels |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['class']} | {_num(r['IoU'], 100)} | {_num(r['Acc'], 100)} | {r['pixels']} |"
        for r in report["per_class"]
    ]
    return "\n".join(lines)


@flow(name="evaluate", **LINEAGE_HOOKS)
def evaluate_flow(
    dataset: str,
    data_root: str,
    model: str = "champion",
    store: str = "./fmbseg-store",
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
    model_name: str | None = None,
) -> EvaluationReport | LabelQualityReport | TeacherComparison:
    """Evaluate ``model`` on the ``dataset`` split stored under ``data_root``.

    Args:
        dataset: ``voc21``, ``voc20``, ``context59``, ``context60``, ``coco-stuff-171``,
            ``coco-object-81`` (``coco-object``), ``coco-object-80``, ``cityscapes`` or
            ``ade20k`` (mmseg layout, see :mod:`fmbseg.data.datasets`).
        model: ``maskclip`` / ``sclip`` (training-free baselines built from
            ``cfg.models``), or a registry reference: ``champion``, ``latest``, ``vNNNN``,
            ``name:version`` or a model version folder URI. ``labels:<merge fp>`` or
            ``labels:latest`` scores stage-1 pseudo-labels instead (:func:`label_quality_flow`);
            several, ``labels:A,labels:B``, compare their teachers side by side
            (:func:`compare_teachers_flow`).
        model_name: registry model name for references without one (default
            ``cfg.train.model_name``).
        limit: evaluate only the first ``limit`` images of the split.

    Returns the :class:`EvaluationReport` (a :class:`LabelQualityReport` or
    :class:`TeacherComparison` for ``labels:``); its ``report_uris`` say where its JSON was
    written (for a registry model next to its card, ``models/{name}/{version}/eval/
    {dataset}.json``; always ``evaluations/{fp}/report.json``).
    """
    if model.startswith(LABELS_PREFIX):
        refs = label_refs(model)
        rest = (store, config, overrides, ray_address, storage_options, limit)
        if len(refs) > 1:
            return compare_teachers_flow(dataset, data_root, refs, *rest)
        return label_quality_flow(dataset, data_root, refs[0], *rest)
    cfg = configure(config, overrides, ray_address)
    st = open_store(store, storage_options)
    job = plan_evaluation_task(
        st,
        dataset,
        data_root,
        model,
        cfg,
        limit=limit,
        model_name=model_name,
        storage_options=storage_options,
    )
    fps = pass_task((EVALUATE,))(job)
    built = build_report(job)
    report = EvaluationReport.from_json(built, write_report(job, built))
    manifest_artifact(st, EVALUATE.name, report.fingerprint)
    table_artifact(
        "evaluate-results",
        [report.table_row()],
        description="evaluation: mIoU and pixel accuracy (fractions)",
    )
    what = f"per-class IoU of {report.model} on {report.dataset}"
    markdown_artifact("evaluate-per-class", per_class_markdown(report.json), description=what)
    flow_lineage(
        st,
        "evaluate",
        dataset=report.dataset,
        data_root=data_root,
        model=job.given.model.identity(),
        limit=limit,
        config=cfg.to_dict(),
        stages=fps,
        report=report.report_uris[0],
    )
    return report


@flow(name="label-quality", **LINEAGE_HOOKS)
def label_quality_flow(
    dataset: str,
    data_root: str,
    labels: str = "latest",
    store: str = "./fmbseg-store",
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> LabelQualityReport:
    """Score the stage-1 pseudo-labels ``labels`` (a ``merge`` fingerprint or ``latest``) of
    ``dataset``'s images against its ground truth: prompt-only (1.1), auto-only (1.2), merged.

    The annotate flow must have labelled the split's image files (matched by content, from
    any location). Returns the :class:`LabelQualityReport`; its ``report_uris``:
    ``evaluations/{fp}/report.json``.
    """
    cfg = configure(config, overrides, ray_address)
    st = open_store(store, storage_options)
    job = plan_label_quality_task(
        st, dataset, data_root, labels, cfg, limit=limit, storage_options=storage_options
    )
    pass_task((LABEL_QUALITY,))(job)
    built = build_label_report(job)
    uri = write_evaluation(st, built["fingerprint"], built)
    report = LabelQualityReport.from_json(built, [uri])
    manifest_artifact(st, LABEL_QUALITY.name, report.fingerprint)
    table_artifact(
        "label-quality-results",
        report.table_rows(),
        description="pseudo-labels vs. ground truth (fractions)",
    )
    markdown_artifact(
        "label-quality-per-class",
        per_class_markdown(report.merged_report()),
        description="per-class IoU of the merged pseudo-labels",
    )
    flow_lineage(
        st,
        "label-quality",
        dataset=report.dataset,
        data_root=data_root,
        labels=report.labels,
        limit=limit,
        config=cfg.to_dict(),
        stages=dict(job.fps),
        report=report.report_uris[0],
    )
    return report


def teachers_markdown(report: dict[str, Any]) -> str:
    """A teacher comparison as a markdown table (percentages; ``-``: figure unavailable)."""
    lines = [
        f"# Teachers on {report['dataset']} ({report['num_images']} images)",
        "",
        "| labels | teacher | mIoU | coverage | masks/image | images/s | unavailable |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['labels']} | {r['teacher'] or '-'} | {_num(r['mIoU'], 100)} | "
        f"{_num(r['coverage'], 100)} | {_num(r['masks_per_image'])} | "
        f"{_num(r['images_per_second'])} | {r['unavailable'] or ''} |"
        for r in report["teachers"]
    ]
    return "\n".join(lines)


@flow(name="compare-teachers", **LINEAGE_HOOKS)
def compare_teachers_flow(
    dataset: str,
    data_root: str,
    labels: list[str],
    store: str = "./fmbseg-store",
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> TeacherComparison:
    """Score several merge outputs of the split's images (one per teacher: annotate run with
    different ``models.sam``) and put them side by side.

    Each is a :func:`label_quality_flow` (its own cached stage and report); the comparison
    (:func:`~fmbseg.tasks.evaluate.label_quality_stage.compare_teachers`) is written to
    ``evaluations/{fp}/report.json``.
    """
    reports = [
        label_quality_flow(
            dataset, data_root, ref, store, config, overrides, ray_address, storage_options, limit
        )
        for ref in labels
    ]
    st = open_store(store, storage_options)
    # the comparison JSON embeds each report with its report_uris
    compared = compare_teachers([r.with_uris() for r in reports])
    uri = write_evaluation(st, compared["fingerprint"], compared)
    report = TeacherComparison.from_json(
        compared,
        [uri],
        teachers=tuple(TeacherRow(**row) for row in compared["teachers"]),
        reports=tuple(reports),
    )
    table_artifact(
        "teacher-comparison",
        report.table_rows(),
        description="teachers side by side: merged pseudo-labels vs. ground truth "
        "(fractions); images/s of the SAM pass",
    )
    markdown_artifact(
        "teacher-comparison-table",
        teachers_markdown(compared),
        description="teachers side by side",
    )
    flow_lineage(
        st,
        "compare-teachers",
        dataset=report.dataset,
        data_root=data_root,
        labels=[r.labels for r in reports],
        limit=limit,
        label_quality=[r.fingerprint for r in reports],
        report=report.report_uris[0],
    )
    return report
