"""``fmbseg retrain``: annotate the images new since the last run, retrain, maybe promote."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fmbseg.cli.annotate import LABELLING, vocabulary_from_args
from fmbseg.cli.core import DRY_RUN, Arg, Common, UsageError, command, positive_int, progress_bars
from fmbseg.data.sources import check_source

if TYPE_CHECKING:
    from fmbseg.flows.retrain import RetrainResult


def print_retrain(out: RetrainResult) -> None:
    """What was new, the model version, and the promotion decision."""
    batch = f" (batch {out.batch})" if out.batch is not None else ""
    print(
        f"retrain: {out.listed} images listed, {out.new_images} new, "
        f"{out.annotated} annotated{batch}; {out.batches} batches in all"
    )
    if out.model is None:
        print(f"  model:    not retrained: {out.reason}")
        return
    model = out.model
    print(f"  model:    {model.ref} on {model.images} images (card {model.card})")
    ev = out.evaluation
    if ev and ev.metrics:
        old = ev.champion_metrics
        vs = f" vs champion {old.mIoU:.4f}" if old and old.mIoU is not None else ""
        print(f"  mIoU:     {ev.metrics.mIoU:.4f} on {ev.metrics.dataset}{vs}")
    verdict = "promoted to champion" if out.promoted else "not promoted"
    print(f"  decision: {verdict}: {out.reason}")


@command(
    "retrain",
    "annotate only the images new since the last run, retrain on all, promote if as good",
    *LABELLING,
    Arg(
        "--mode",
        choices=("scratch", "finetune"),
        default="scratch",
        help="train anew on every batch, or fine-tune the champion (default %(default)s)",
    ),
    Arg(
        "--eval-dataset",
        default=None,
        help="held-out set to compare the new model with the champion: 'folder' (your own "
        "images/, labels/ and classes.txt) or a benchmark name",
    ),
    Arg("--eval-data-root", default=None, help="the held-out set's folder or URI"),
    Arg(
        "--eval-limit",
        type=positive_int("--eval-limit"),
        default=None,
        help="evaluate only the first N images",
    ),
    DRY_RUN,
)
def cmd_retrain(args: argparse.Namespace, common: Common) -> int:
    vocabulary = vocabulary_from_args(args)
    if (args.eval_dataset is None) != (args.eval_data_root is None):
        raise UsageError("give both --eval-dataset and --eval-data-root, or neither")
    check_source(args.images, common.storage_options)
    if args.dry_run:
        from fmbseg.flows.dry_run import print_plans, retrain_dry_run

        plans = retrain_dry_run(
            common.open_store(),
            common.cfg,
            args.images,
            vocabulary,
            args.mode,
            common.storage_options or None,
            args.image_root,
        )
        print_plans("retrain", plans)
        return 0
    from fmbseg.flows.retrain import retrain_flow

    with progress_bars():
        out = retrain_flow(
            images=args.images,
            **common.flow_args(),
            classes=list(vocabulary),
            image_root=args.image_root,
            mode=args.mode,
            eval_dataset=args.eval_dataset,
            eval_data_root=args.eval_data_root,
            eval_limit=args.eval_limit,
        )
    print_retrain(out)
    return 0
