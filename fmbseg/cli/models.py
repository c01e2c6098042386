"""``fmbseg models list|show|promote``: the model registry from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fmbseg.cli.core import Arg, Common, UsageError, command, usage_errors
from fmbseg.storage.models import ModelRegistry, check_name

ACTIONS = ("list", "show", "promote")


def _split_ref(ref: str | None, action: str) -> tuple[str, str]:
    if not ref:
        raise UsageError(f"models {action} needs NAME:vNNNN (see `fmbseg models list`)")
    name, sep, version = ref.partition(":")
    return _valid_name(name), version if sep else ("latest" if action == "show" else "")


def _valid_name(name: str) -> str:
    with usage_errors("", ValueError):
        check_name(name)  # the name becomes part of a store path
    return name


def _metrics(card: dict[str, Any]) -> str:
    metrics = dict(card.get("metrics") or {})
    for key, entry in sorted((card.get("evaluations") or {}).items()):
        if isinstance(entry, dict) and entry.get("mIoU") is not None:
            metrics[f"mIoU[{key}]"] = entry["mIoU"]
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    return ", ".join(parts) or "-"


def version_line(card: dict[str, Any], champion: str | None) -> str:
    """One version: marker, version, when, lineage, metrics."""
    data = card.get("data") or {}
    mark = "*" if card.get("version") == champion else " "
    sets = data.get("label_sets") or []
    labels = data.get("labels_fp", "-")
    if len(sets) > 1:
        labels = f"{labels} (+{len(sets) - 1} more sets)"
    vocab = card.get("vocabulary") or []
    return (
        f"  {mark} {card.get('version')}  {str(card.get('created_at', '-'))[:19]}  "
        f"labels {labels}  index {data.get('index_fp', '-')}  {data.get('images', '?')} images, "
        f"{len(vocab)} classes  {_metrics(card)}"
    )


def list_models(registry: ModelRegistry, only: str | None) -> list[str]:
    names = [_valid_name(only)] if only else registry.names()
    if not names:
        return [f"models: none in {registry.store.uri} (train one with `fmbseg train`)"]
    lines = []
    for name in names:
        versions = registry.versions(name)
        champion = registry.champion(name)
        lines.append(f"{name}: {len(versions)} version(s), champion {champion or 'none'}")
        lines += [version_line(registry.card(name, v), champion) for v in versions]
    lines.append("(* = champion; lineage: merge fingerprint of the labels, index fingerprint)")
    return lines


def show_model(registry: ModelRegistry, name: str, version: str) -> list[str]:
    card = registry.card(name, version)
    champion = registry.champion(name)
    status = "champion" if card["version"] == champion else f"champion is {champion or 'none'}"
    rel = registry.rel(name, card["version"])
    return [
        f"{name}:{card['version']} ({status})  {registry.store.url(rel)}",
        json.dumps(card, indent=1, sort_keys=True),
    ]


def promote_model(registry: ModelRegistry, name: str, version: str, reason: str) -> list[str]:
    if not version or version in ("latest", "champion"):
        raise UsageError(f"models promote needs an explicit version: {name}:vNNNN")
    from fmbseg.segment import alignment_module

    version = registry.resolve_version(name, version)
    # refuse a version that segment/evaluate could not load
    alignment_module(*registry.load(name, version), f"model {name}:{version} cannot be promoted")
    current = registry.champion(name)
    if current == version:
        return [f"{name}:{version} is already the champion; nothing changed"]
    card = registry.card(name, version)
    metrics = dict(card.get("metrics") or {})
    registry.promote(name, version, reason, metrics)
    registry.update_card(
        name,
        version,
        {
            "promotion": {
                "promoted": True,
                "reason": reason,
                "previous_champion": current,
                "candidate_metrics": metrics,
                "by": "fmbseg models promote",
            }
        },
    )
    return [
        f"{name}: champion {current or 'none'} -> {version} ({reason})",
        f"  recorded in {registry.store.url(registry.rel(name, file='champion.json'))}",
    ]


@command(
    "models",
    "list the model registry, show a card, or promote a version to champion",
    Arg("action", choices=ACTIONS, help="list | show | promote"),
    Arg(
        "ref",
        nargs="?",
        default=None,
        metavar="NAME[:vNNNN]",
        help="list: a model name (default all); show: NAME[:vNNNN|latest|champion] "
        "(default latest); promote: NAME:vNNNN",
    ),
    Arg(
        "--reason",
        default="promoted by hand (fmbseg models promote)",
        help="promote: why (recorded with the decision)",
    ),
)
def cmd_models(args: argparse.Namespace, common: Common) -> int:
    registry = ModelRegistry(common.open_store())
    if args.action == "list":
        lines = list_models(registry, args.ref)
    elif args.action == "show":
        lines = show_model(registry, *_split_ref(args.ref, "show"))
    else:
        if not args.reason.strip():
            raise UsageError("--reason must not be empty")
        lines = promote_model(registry, *_split_ref(args.ref, "promote"), args.reason.strip())
    print("\n".join(lines))
    return 0
