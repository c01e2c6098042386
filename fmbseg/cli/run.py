"""``fmbseg run``: the whole pipeline (annotate-and-train), by default on five photos bundled
with scikit-image (written into the store under ``samples/``) and the ``quickstart`` config,
whose pretrained weights download on first use; offline, it says how to run ``--config tiny``."""

from __future__ import annotations

import argparse

from fmbseg.cli.annotate import CLASSES, VOCAB, print_annotation_summary, vocabulary_from_args
from fmbseg.cli.core import DRY_RUN, IMAGE_ROOT, TEACHER, Arg, Common, command, progress_bars
from fmbseg.data.sources import check_source
from fmbseg.engine.runner import StageError
from fmbseg.models.weights import WeightsNotFoundError

OFFLINE_HINT = (
    "the {config!r} config needs pretrained weights that could not be loaded (offline?).\n"
    "  {error}\n"
    "Run the pipeline with tiny random-weight models instead (it runs end to end; the labels "
    "mean nothing):\n  fmbseg run --config tiny\n"
    "or point models.clip_weights / sam_weights / dino_weights at local or store copies "
    "with --set (see README, 'Models and weights')."
)


def dry_run(args: argparse.Namespace, common: Common, vocabulary: tuple[str, ...]) -> int:
    """``run --dry-run``: the annotate stages and train; the bundled photos are planned only
    once a run has written them into the store (their fingerprints depend on where they are)."""
    from fmbseg.flows.dry_run import print_plans, run_dry_run

    store = common.open_store()
    images = args.images
    if images is None:
        if not store.ls("samples"):
            print(
                f"run --dry-run: nothing is run or written; the sample photos are not in "
                f"{store.url('samples')} yet (a run writes them first), so their stages "
                "cannot be planned: pass --images to plan your own"
            )
            return 0
        images = store.url("samples")
    else:
        check_source(images, common.storage_options)
    plans = run_dry_run(
        store, common.cfg, images, vocabulary, common.storage_options or None, args.image_root
    )
    print_plans("run", plans)
    return 0


@command(
    "run",
    "annotate-and-train on the bundled sample photos (or --images): labels, gallery, model",
    Arg(
        "--images",
        default=None,
        help="image source (default: the five sample photos bundled with scikit-image)",
    ),
    CLASSES,
    VOCAB,
    IMAGE_ROOT,
    Arg("--eval-dataset", default=None, help="evaluate on this dataset (voc21, folder, ...)"),
    Arg("--eval-data-root", default=None, help="root of the evaluation dataset"),
    TEACHER,
    DRY_RUN,
    config="quickstart",
)
def cmd_run(args: argparse.Namespace, common: Common) -> int:
    from fmbseg.data.samples import SAMPLE_CLASSES, write_sample_photos

    if args.classes is None and args.vocab is None:
        args.classes = ",".join(SAMPLE_CLASSES)
    vocabulary = vocabulary_from_args(args)
    store = common.open_store()
    if args.dry_run:
        return dry_run(args, common, vocabulary)
    if args.images is None:
        images = write_sample_photos(store.url("samples"), common.storage_options)
        print(f"run: {len(SAMPLE_CLASSES)} classes on the bundled sample photos in {images}")
    else:
        images = args.images
        check_source(images, common.storage_options)
    from fmbseg.flows.annotate_and_train import annotate_and_train_flow

    try:
        with progress_bars():
            out = annotate_and_train_flow(
                images=images,
                **common.flow_args(),
                classes=list(vocabulary),
                image_root=args.image_root,
                eval_dataset=args.eval_dataset,
                eval_data_root=args.eval_data_root,
            )
    except (WeightsNotFoundError, StageError) as exc:
        missing = exc if isinstance(exc, WeightsNotFoundError) else exc.cause
        if not isinstance(missing, WeightsNotFoundError):
            raise
        print(f"fmbseg: {OFFLINE_HINT.format(config=common.config, error=missing)}")
        return 2
    print_annotation_summary(out.annotation.summary)
    model, evaluation = out.training.model, out.evaluation
    print(f"  model:       {model.ref}  {model.card}")
    if evaluation.metrics:
        print(f"  evaluation:  mIoU {evaluation.metrics.mIoU:.4f}")
    print(
        f"  champion:    {'promoted' if evaluation.promoted else 'not promoted'} "
        f"({evaluation.reason})"
    )
    print(
        f'segment new images with:\n  fmbseg segment IMAGE --classes "{",".join(vocabulary)}"'
        f" --model champion --store {common.store}"
    )
    return 0
