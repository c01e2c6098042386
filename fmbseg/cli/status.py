"""``fmbseg status``: what a store holds, read from the store alone (no Prefect server)."""

from __future__ import annotations

import argparse
from typing import Any

from fmbseg.cli.core import Arg, Common, command, positive_int
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import ArtifactStore


def _when(stamp: Any) -> str:
    return str(stamp or "-")[:19].replace("T", " ")


def stage_lines(store: ArtifactStore) -> list[str]:
    lines = []
    for stage in store.ls("stages"):
        for fp in store.committed_fingerprints(stage):
            m = store.manifest(stage, fp)
            if m is None:  # deleted between the listing and the read
                continue
            lines.append(
                f"  {stage:<12} {fp}  {m.rows:>8} rows  {m.error_rows:>5} errors  "
                f"{m.num_shards:>4} shards  {_when(m.committed_at)}"
            )
    return lines or ["  none (run `fmbseg annotate` or `fmbseg index`)"]


def export_lines(store: ArtifactStore) -> list[str]:
    lines = []
    for fp in store.ls("exports"):
        rel = f"exports/{fp}/export.json"
        if not store.exists(rel):
            lines.append(f"  {fp}  incomplete (no export.json yet)")
            continue
        try:
            record = store.read_json(rel)
        except (ValueError, UnicodeDecodeError):
            lines.append(f"  {fp}  unreadable export.json")
            continue
        manifest = store.manifest("export", fp)
        when = _when(manifest.committed_at) if manifest else "-"
        gallery = (record.get("files") or {}).get("gallery")
        link = store.url(f"exports/{fp}/{gallery}") if gallery else "no gallery"
        lines.append(
            f"  {fp}  {record.get('images', '?')} images, "
            f"{len(record.get('vocabulary') or [])} classes, {record.get('masks', '?')} masks  "
            f"{when}  {link}"
        )
    return lines or ["  none"]


def model_lines(store: ArtifactStore) -> list[str]:
    registry = ModelRegistry(store)
    lines = []
    for name in registry.names():
        versions = registry.versions(name)
        latest = versions[-1] if versions else "-"
        lines.append(
            f"  {name}: {len(versions)} version(s), latest {latest}, "
            f"champion {registry.champion(name) or 'none'}"
        )
    return lines or ["  none"]


def run_lines(store: ArtifactStore, limit: int) -> list[str]:
    runs = []
    for entry in store.ls("runs"):
        if not entry.endswith(".json"):
            continue
        try:
            record = store.read_json(f"runs/{entry}")
        except (ValueError, UnicodeDecodeError):
            runs.append(("", {"run_id": entry[:-5], "outcome": "unreadable"}))
            continue
        if isinstance(record, dict):
            runs.append((str(record.get("started_at") or record.get("written_at") or ""), record))
    runs.sort(key=lambda r: r[0])
    lines = []
    for started, record in runs[-limit:]:
        duration = record.get("duration_s")
        took = f"{duration:.1f} s" if isinstance(duration, (int, float)) else "-"
        parent = record.get("parent_run")
        lines.append(
            f"  {_when(started)}  {str(record.get('flow', '?')):<18} "
            f"{str(record.get('outcome', '?')):<9} {took:>9}  {record.get('run_id', '?')}"
            + (f"  (in {parent})" if parent else "")
        )
    if len(runs) > limit:
        lines.insert(0, f"  ({len(runs) - limit} older not shown; --runs N)")
    return lines or ["  none"]


def store_status(store: ArtifactStore, runs: int = 10) -> list[str]:
    """The report ``fmbseg status`` prints, as lines."""
    return [
        f"store {store.uri}",
        "stages (committed):",
        *stage_lines(store),
        "exports:",
        *export_lines(store),
        "models:",
        *model_lines(store),
        f"runs (latest {runs}):",
        *run_lines(store, runs),
    ]


@command(
    "status",
    "list what a store holds: committed stages, exports, models and champions, recent runs",
    Arg(
        "--runs",
        type=positive_int("--runs"),
        default=10,
        metavar="N",
        help="how many recent runs to list (default %(default)s)",
    ),
)
def cmd_status(args: argparse.Namespace, common: Common) -> int:
    store = common.open_store()
    print("\n".join(store_status(store, args.runs)))
    return 0
