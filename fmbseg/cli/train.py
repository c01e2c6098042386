"""``fmbseg train``: train the open-vocabulary segmenter on committed pseudo-labels."""

from __future__ import annotations

import argparse

from fmbseg.cli.core import DEFAULT_STORE, DRY_RUN, Arg, Common, command, progress_bars


@command(
    "train",
    "train the open-vocabulary segmenter (stage 2) on committed pseudo-labels",
    Arg(
        "--labels",
        default="latest",
        metavar="FINGERPRINT|latest",
        help="merge-stage fingerprint of the pseudo-labels to train on, or 'latest' "
        "(the most recently committed; default)",
    ),
    DRY_RUN,
)
def cmd_train(args: argparse.Namespace, common: Common) -> int:
    if args.dry_run:
        from fmbseg.flows.dry_run import print_plans, train_dry_run

        print_plans("train", train_dry_run(common.open_store(), common.cfg, args.labels))
        return 0
    from fmbseg.flows.train import train_flow

    with progress_bars():
        result = train_flow(**common.flow_args(), labels=args.labels)
    model = result.model
    ref = model.ref
    cached = " (cache hit: already trained on these labels, nothing retrained)"
    losses = model.epoch_losses
    print(f"train: model {ref}{cached if result.cached else ''}")
    print(
        f"  labels:     {model.labels} (merge), index {model.index}, "
        f"{model.images} images, {len(model.vocabulary)} classes"
    )
    print(f"  epochs:     {len(losses)}, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  weights:    {model.weights}")
    print(f"  card:       {model.card}")
    print(f"  loss curve: {model.loss_curve}")
    store = "" if common.store == DEFAULT_STORE else f" --store {common.store}"
    if result.promoted:
        print(
            f"  champion:   {model.version} (the first model of {model.name} becomes its champion)"
        )
    else:
        print(
            f"  champion:   {result.champion or 'none'} (promote this version with: "
            f"fmbseg models promote {ref} --reason TEXT{store})"
        )
    print(f'  use it:     fmbseg segment IMAGE... --classes "cat,dog,grass" --model {ref}{store}')
    print("              (--model champion = the promoted version; --model latest = the newest)")
    return 0
