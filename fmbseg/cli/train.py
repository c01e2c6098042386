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

    with progress_bars(units={"train": "epoch"}):
        result = train_flow(
            store=common.store,
            labels=args.labels,
            config=common.config,
            overrides=list(common.overrides),
            ray_address=common.ray_address,
            storage_options=common.storage_options or None,
        )
    ref = f"{result['model']}:{result['version']}"
    cached = " (cache hit: already trained on these labels, nothing retrained)"
    losses = result["epoch_losses"]
    print(f"train: model {ref}{cached if result['cached'] else ''}")
    print(
        f"  labels:     {result['labels']} (merge), index {result['index']}, "
        f"{result['images']} images, {len(result['vocabulary'])} classes"
    )
    print(f"  epochs:     {len(losses)}, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  weights:    {result['weights']}")
    print(f"  card:       {result['card']}")
    print(f"  loss curve: {result['loss_curve']}")
    store = "" if common.store == DEFAULT_STORE else f" --store {common.store}"
    name = result["model"]
    if result["promoted"]:
        print(f"  champion:   {result['version']} (the first model of {name} becomes its champion)")
    else:
        print(
            f"  champion:   {result['champion'] or 'none'} (promote this version with: "
            f"fmbseg models promote {ref} --reason TEXT{store})"
        )
    print(f'  use it:     fmbseg segment IMAGE... --classes "cat,dog,grass" --model {ref}{store}')
    print("              (--model champion = the promoted version; --model latest = the newest)")
    return 0
