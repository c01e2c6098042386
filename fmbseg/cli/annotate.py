"""``fmbseg annotate``: pseudo-label an image source for a list of classes (stage 1)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fmbseg.cli.core import (
    DRY_RUN,
    IMAGE_ROOT,
    IMAGES,
    TEACHER,
    Arg,
    Common,
    UsageError,
    command,
    progress_bars,
    usage_errors,
)
from fmbseg.cli.index import print_failures, skipped_files
from fmbseg.data.sources import check_source
from fmbseg.data.vocab import builtin_vocabularies, vocabulary_aliases

if TYPE_CHECKING:
    from fmbseg.flows.annotate import AnnotationSummary

IMAGE_LABELS = Arg(
    "--image-labels",
    default=None,
    metavar="FILE",
    help="image-level tags that replace CLIP's presence vote: a COCO JSON (each image's "
    "annotation categories), or a .parquet/.csv with an image column (file name relative to "
    "the source root, or URI) and a names column; names must be in the vocabulary",
)
CLASSES = Arg("--classes", default=None, help='class names, comma-separated: "cat,dog,grass"')
_ALIASES = ", ".join(f"{a}={n}" for a, n in sorted(vocabulary_aliases().items()))
VOCAB = Arg(
    "--vocab",
    default=None,
    help=f"built-in vocabulary: {', '.join(builtin_vocabularies())} (aliases: {_ALIASES}); "
    "or a .txt file with one name per line; or a comma list (one name: 'cat,')",
)
LABELLING = (IMAGES, CLASSES, VOCAB, IMAGE_ROOT, TEACHER)  # annotate's and retrain's


def vocabulary_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """--classes or --vocab, validated here so bad names, or more classes than a label map
    holds, fail before any work."""
    from fmbseg.data.vocab import MAX_LABEL_CLASSES, resolve_vocabulary

    try:
        return resolve_vocabulary(args.classes, args.vocab, "--classes", MAX_LABEL_CLASSES)
    except (ValueError, OSError) as exc:
        message = str(exc).replace("classes (names) or vocab", "--classes or --vocab")
        raise UsageError(message) from exc


def print_annotation_summary(summary: AnnotationSummary) -> None:
    classes = summary.classes_found
    top = ", ".join(f"{name} {n}" for name, n in list(classes.items())[:8])
    more = f" (+{len(classes) - 8} more)" if len(classes) > 8 else ""
    print(
        f"annotate: {summary.images_indexed} images indexed, "
        f"{summary.images_with_masks} labelled, {summary.images_no_label} with no "
        f"confident label, {summary.images_failed} failed; "
        + (
            f"{summary.masks_sam3} SAM 3 masks"
            if summary.masks_sam3
            else f"{summary.masks_prompt} prompt masks, {summary.masks_auto} automatic masks"
        )
    )
    print(f"  classes found: {len(classes)}{': ' + top + more if classes else ''}")
    if summary.skipped_extensions:
        print(f"  {skipped_files(summary.skipped_extensions)}")
    for stage, counts in summary.errors.items():
        details = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        print(f"  {stage} errors: {details}")
    print_failures(summary.first_errors)
    if summary.first_errors:
        print(f"  every failure:  {summary.errors_table}")
    print(f"  COCO JSON:   {summary.coco}")
    print(f"  label maps:  {summary.export}/labels/")
    if summary.gallery:
        print(f"  gallery:     {summary.gallery}")


@command(
    "annotate",
    "pseudo-label images for a list of classes with CLIP + SAM or SAM 3 (COCO RLE, PNG, Parquet, gallery)",
    *LABELLING,
    IMAGE_LABELS,
    DRY_RUN,
)
def cmd_annotate(args: argparse.Namespace, common: Common) -> int:
    vocabulary = vocabulary_from_args(args)
    check_source(args.images, common.storage_options)
    tags = None
    if args.image_labels is not None:  # unknown names fail before any work
        from fmbseg.data.image_labels import ImageLabelsError, load_image_labels

        with usage_errors("--image-labels: ", ImageLabelsError):
            tags = load_image_labels(args.image_labels, vocabulary, common.storage_options)
    if args.dry_run:
        from fmbseg.data.sources import source_root
        from fmbseg.flows.dry_run import annotate_dry_run, print_plans

        if tags is not None:  # as the flow binds them
            tags = tags.bound_to(source_root(args.images, args.image_root))
        plans = annotate_dry_run(
            common.open_store(),
            common.cfg,
            args.images,
            vocabulary,
            common.storage_options or None,
            args.image_root,
            tags,
        )
        print_plans("annotate", plans)
        return 0
    from fmbseg.flows.annotate import annotate_flow

    with progress_bars():
        out = annotate_flow(
            images=args.images,
            **common.flow_args(),
            classes=list(vocabulary),
            image_root=args.image_root,
            image_labels=args.image_labels,
        )
    print_annotation_summary(out.summary)
    print(f"  merge fingerprint (for `fmbseg train --labels`): {out.fingerprints['merge']}")
    return 0
