"""Flow ``evaluate``: mIoU of a model on a benchmark split (METHOD "Evaluation").

plan (open the split, resolve the model, fingerprint) -> stage ``evaluate`` (shards of the
split on Ray, one confusion matrix per shard) -> exact merge -> report JSON in the store,
artifacts, lineage. The stage is cached by its fingerprint, so evaluating the same model
on the same split again reads the committed shard matrices instead of running the model.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from fmbseg.config import Config
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    StageProgress,
    configure,
    current_flow_run_id,
    manifest_artifact,
    markdown_artifact,
    open_store,
    record_lineage,
    retry_unless_user_error,
    stage_task,
    table_artifact,
)
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.evaluate.label_quality_stage import STAGE as LQ_STAGE
from fmbseg.tasks.evaluate.label_quality_stage import (
    LabelsPlan,
    build_label_report,
    compare_teachers,
    plan_label_quality,
    run_label_quality,
    write_label_report,
)
from fmbseg.tasks.evaluate.stage import (
    STAGE,
    EvalPlan,
    build_report,
    plan_evaluation,
    run_evaluate,
    write_report,
)

LABELS_PREFIX = "labels:"


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


@task(
    name="plan-evaluation",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def plan_evaluation_task(
    store: ArtifactStore,
    dataset: str,
    data_root: str,
    model: str,
    cfg: Config,
    limit: int | None,
    model_name: str | None,
    storage_options: dict[str, Any] | None,
) -> EvalPlan:
    """List the split's files, resolve the model reference, compute the fingerprint."""
    return plan_evaluation(
        store,
        dataset,
        data_root,
        model,
        cfg,
        limit=limit,
        model_name=model_name,
        storage_options=storage_options,
    )


@stage_task(STAGE)
def evaluate_task(store: ArtifactStore, fp: str, plan: EvalPlan, cfg: Config) -> str:
    """The protocol over every shard of the split; one confusion matrix per shard."""
    return run_evaluate(store, plan, cfg, progress=StageProgress(STAGE, fp))


@task(
    name="plan-label-quality",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def plan_label_quality_task(
    store: ArtifactStore,
    dataset: str,
    data_root: str,
    labels: str,
    cfg: Config,
    limit: int | None,
    storage_options: dict[str, Any] | None,
) -> LabelsPlan:
    """List the split, resolve the merge output, locate its records, fingerprint."""
    return plan_label_quality(
        store, dataset, data_root, labels, cfg, limit=limit, storage_options=storage_options
    )


@stage_task(LQ_STAGE)
def label_quality_task(store: ArtifactStore, fp: str, plan: LabelsPlan, cfg: Config) -> str:
    """Prompt-only, auto-only and merged pseudo-label maps vs. the truth, per shard."""
    return run_label_quality(store, plan, cfg, progress=StageProgress(LQ_STAGE, fp))


def per_class_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table of per-class IoU / accuracy (percentages)."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        f"# {report['model']} on {report['dataset']}",
        "",
        f"mIoU **{pct(report['mIoU'])}**, mAcc {pct(report['mAcc'])}, pixel accuracy "
        f"{pct(report['aAcc'])} over {report['num_images']} images "
        f"(fingerprint `{report['fingerprint']}`).",
        "",
        "| class | IoU | Acc | pixels |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['class']} | {pct(r['IoU'])} | {pct(r['Acc'])} | {r['pixels']} |"
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
) -> dict[str, Any]:
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

    Returns the report (see :func:`fmbseg.tasks.evaluate.stage.build_report`) plus
    ``report_uris``: where its JSON was written (for a registry model next to its card,
    ``models/{name}/{version}/eval/{dataset}.json``; always ``evaluations/{fp}/report.json``).
    """
    if model.startswith(LABELS_PREFIX):
        refs = label_refs(model)
        if len(refs) > 1:
            return compare_teachers_flow(
                dataset,
                data_root,
                refs,
                store,
                config,
                overrides,
                ray_address,
                storage_options,
                limit,
            )
        return label_quality_flow(
            dataset,
            data_root,
            refs[0],
            store,
            config,
            overrides,
            ray_address,
            storage_options,
            limit,
        )
    cfg = configure(config, overrides, ray_address)
    st = open_store(store, storage_options)
    plan = plan_evaluation_task(
        st, dataset, data_root, model, cfg, limit, model_name, storage_options
    )
    fp = evaluate_task(st, plan.fingerprint, plan, cfg)
    report = build_report(st, plan, cfg)
    uris = write_report(st, plan, report)
    manifest_artifact(st, STAGE, fp)
    table_artifact(
        "evaluate-results",
        [
            {
                "dataset": report["dataset"],
                "model": report["model"],
                "mIoU": report["mIoU"],
                "pixel_acc": report["aAcc"],
                "images": report["num_images"],
                "report": uris[0],
            }
        ],
        description="evaluation: mIoU and pixel accuracy (fractions)",
    )
    what = f"per-class IoU of {report['model']} on {report['dataset']}"
    markdown_artifact("evaluate-per-class", per_class_markdown(report), description=what)
    record_lineage(
        st,
        current_flow_run_id(),
        {
            "flow": "evaluate",
            "dataset": plan.dataset.name,
            "data_root": data_root,
            "model": plan.model.identity(),
            "limit": limit,
            "config": cfg.to_dict(),
            "stages": {STAGE: fp},
            "report": uris[0],
        },
    )
    return {**report, "report_uris": uris}


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
) -> dict[str, Any]:
    """Score the stage-1 pseudo-labels ``labels`` (a ``merge`` fingerprint or ``latest``) of
    ``dataset``'s images against its ground truth: prompt-only (1.1), auto-only (1.2), merged.

    The annotate flow must have labelled the split's image files (matched by content, from
    any location). Returns the report (:func:`~fmbseg.tasks.evaluate.label_quality_stage.
    build_label_report`) plus ``report_uris`` (``evaluations/{fp}/report.json``).
    """
    cfg = configure(config, overrides, ray_address)
    st = open_store(store, storage_options)
    plan = plan_label_quality_task(st, dataset, data_root, labels, cfg, limit, storage_options)
    fp = label_quality_task(st, plan.fingerprint, plan, cfg)
    report = build_label_report(st, plan)
    uris = write_label_report(st, plan, report)
    manifest_artifact(st, LQ_STAGE, fp)
    rows = [
        {
            "dataset": report["dataset"],
            "labels": v,
            "mIoU": report[v]["mIoU"],
            "pixel_acc": report[v]["aAcc"],
            "coverage": report[v]["coverage"],
            "precision": report[v]["precision"],
            "images": report["num_images"],
        }
        for v in ("prompt", "auto", "merged")
    ]
    table_artifact(
        "label-quality-results", rows, description="pseudo-labels vs. ground truth (fractions)"
    )
    merged = {
        **report["merged"],
        "model": f"{report['model']} (merged)",
        "dataset": report["dataset"],
        "num_images": report["num_images"],
        "fingerprint": fp,
    }
    markdown_artifact(
        "label-quality-per-class",
        per_class_markdown(merged),
        description="per-class IoU of the merged pseudo-labels",
    )
    record_lineage(
        st,
        current_flow_run_id(),
        {
            "flow": "label-quality",
            "dataset": plan.dataset.name,
            "data_root": data_root,
            "labels": plan.merge_fp,
            "limit": limit,
            "config": cfg.to_dict(),
            "stages": {LQ_STAGE: fp, "merge": plan.merge_fp},
            "report": uris[0],
        },
    )
    return {**report, "report_uris": uris}


def teachers_markdown(report: dict[str, Any]) -> str:
    """A teacher comparison as a markdown table (percentages; ``-``: figure unavailable)."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"# Teachers on {report['dataset']} ({report['num_images']} images)",
        "",
        "| labels | teacher | mIoU | coverage | masks/image | images/s | unavailable |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['labels']} | {r['teacher'] or '-'} | {pct(r['mIoU'])} | "
        f"{pct(r['coverage'])} | {num(r['masks_per_image'])} | "
        f"{num(r['images_per_second'])} | {r['unavailable'] or ''} |"
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
) -> dict[str, Any]:
    """Score several merge outputs of the split's images (one per teacher: annotate run with
    different ``models.sam``) and put them side by side.

    Each is a :func:`label_quality_flow` (its own cached stage and report); the comparison
    (:func:`~fmbseg.tasks.evaluate.label_quality_stage.compare_teachers`) is written to
    ``evaluations/{fp}/report.json`` and published as the ``teacher-comparison`` table and
    markdown artifacts. Returns it plus ``report_uris``.
    """
    reports = [
        label_quality_flow(
            dataset, data_root, ref, store, config, overrides, ray_address, storage_options, limit
        )
        for ref in labels
    ]
    st = open_store(store, storage_options)
    report = compare_teachers(reports)
    rel = f"evaluations/{report['fingerprint']}/report.json"
    st.write_json(rel, report)
    uris = [st.url(rel)]
    table_artifact(
        "teacher-comparison",
        [
            {
                k: r[k]
                for k in (
                    "labels",
                    "teacher",
                    "mIoU",
                    "coverage",
                    "masks_per_image",
                    "images_per_second",
                    "unavailable",
                )
            }
            for r in report["teachers"]
        ],
        description="teachers side by side: merged pseudo-labels vs. ground truth "
        "(fractions); images/s of the SAM pass",
    )
    markdown_artifact(
        "teacher-comparison-table", teachers_markdown(report), description="teachers side by side"
    )
    record_lineage(
        st,
        current_flow_run_id(),
        {
            "flow": "compare-teachers",
            "dataset": report["dataset"],
            "data_root": data_root,
            "labels": [r["labels"] for r in reports],
            "limit": limit,
            "label_quality": [r["fingerprint"] for r in reports],
            "report": uris[0],
        },
    )
    return {**report, "report_uris": uris}
