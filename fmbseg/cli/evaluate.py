"""``fmbseg evaluate``: mIoU of a model (or a training-free baseline) on a benchmark split."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fmbseg.cli.core import Arg, Common, command, positive_int, progress_bars, usage_errors
from fmbseg.data.datasets import dataset_names

if TYPE_CHECKING:
    from fmbseg.flows.evaluate import LabelQualityReport, TeacherComparison


def labels_summary(report: LabelQualityReport) -> str:
    """Prompt-only / auto-only / merged pseudo-labels in one table, then the merged per class."""
    from fmbseg.tasks.evaluate.protocol import format_report

    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:6.2f}"

    lines = [
        f"pseudo-labels {report.labels} on {report.dataset}: {report.num_images} "
        f"images ({report.images_without_records} without records)",
        f"{'labels':<10}{'mIoU':>8}{'aAcc':>8}{'coverage':>10}{'precision':>11}",
    ]
    for v in ("prompt", "auto", "merged"):
        r = report.variant(v)
        lines.append(
            f"{v:<10}{pct(r['mIoU']):>8}{pct(r['aAcc']):>8}{pct(r['coverage']):>10}"
            f"{pct(r['precision']):>11}"
        )
    merged = {
        **report.merged,
        "dataset": f"{report.dataset} (merged)",
        "num_images": report.num_images,
        "dataset_description": report.json.get("dataset_description"),
    }
    return "\n".join([*lines, "", format_report(merged)])


def teachers_summary(report: TeacherComparison) -> str:
    """Teachers side by side: one column per merge output (its teacher = ``models.sam`` of
    its SAM stages); ``n/a`` where a figure is unavailable, with the reason below."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    cols = report.teachers
    rows = [
        ("teacher", [c.teacher or "n/a" for c in cols]),
        ("labels", [c.labels for c in cols]),
        ("mIoU", [pct(c.mIoU) for c in cols]),
        ("coverage", [pct(c.coverage) for c in cols]),
        ("precision", [pct(c.precision) for c in cols]),
        ("masks/image", [num(c.masks_per_image) for c in cols]),
        ("images/s", [num(c.images_per_second) for c in cols]),
    ]
    width = max(10, *(len(v) + 2 for _, vals in rows for v in vals))
    lines = [
        f"teachers on {report.dataset}: {report.num_images} images "
        "(merged pseudo-labels vs. ground truth, %; images/s of the SAM pass)"
    ]
    lines += [f"{name:<13}" + "".join(f"{v:>{width}}" for v in vals) for name, vals in rows]
    for i, c in enumerate(cols, 1):
        if c.unavailable:
            lines.append(f"  n/a in column {i} ({c.labels}): {c.unavailable}")
    return "\n".join(lines)


@command(
    "evaluate",
    "evaluate a model or a baseline on a benchmark split (mIoU, per-class IoU)",
    Arg("--dataset", required=True, help=f"benchmark: {', '.join(dataset_names())}"),
    Arg(
        "--data-root",
        required=True,
        help="the dataset's folder in mmsegmentation's layout (or its parent), path or URI",
    ),
    Arg(
        "--model",
        default="champion",
        help="maskclip | sclip (baselines from the config's CLIP), or a registry reference: "
        "champion, latest, vNNNN, name:version, a model folder URI; or labels:latest | "
        "labels:<merge fingerprint> to score pseudo-labels; several, labels:A,labels:B, to "
        "compare their teachers side by side (default %(default)s)",
    ),
    Arg(
        "--name",
        default=None,
        dest="model_name",
        help="registry model name for champion/latest/vNNNN (default: train.model_name)",
    ),
    Arg(
        "--limit",
        type=positive_int("--limit"),
        default=None,
        help="evaluate only the first N images",
    ),
)
def cmd_evaluate(args: argparse.Namespace, common: Common) -> int:
    from fmbseg.flows.evaluate import (
        EvaluationReport,
        LabelQualityReport,
        TeacherComparison,
        evaluate_flow,
        label_refs,
    )
    from fmbseg.tasks.evaluate.protocol import format_report

    if "," in args.model:
        with usage_errors("--model: ", ValueError):
            label_refs(args.model)
    with progress_bars():
        report = evaluate_flow(
            dataset=args.dataset,
            data_root=args.data_root,
            model=args.model,
            **common.flow_args(),
            limit=args.limit,
            model_name=args.model_name,
        )
    if isinstance(report, TeacherComparison):  # model=labels:A,labels:B: side by side
        print(teachers_summary(report))
    elif isinstance(report, LabelQualityReport):  # model=labels:...: three label maps
        print(labels_summary(report))
    else:
        print(format_report(report.json))
    if isinstance(report, EvaluationReport) and report.images_failed:
        print(f"  {report.images_failed} images could not be read (see the stage's errors)")
    print(f"model:       {report.model}")
    print(f"fingerprint: {report.fingerprint}")
    for uri in report.report_uris:
        print(f"report:      {uri}")
    return 0
