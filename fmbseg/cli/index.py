"""``fmbseg index``: list an image source and index it."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable
from typing import Any

from fmbseg.cli.core import IMAGE_ROOT, IMAGES, Common, command, progress_bars
from fmbseg.data.sources import check_source
from fmbseg.storage.manifest import now

FAILURES_SHOWN = 5  # failing files a summary names, not only counts


def skipped_files(skipped: dict[str, int]) -> str:
    """One line naming the files a folder walk left out, by extension, and why."""
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items(), key=lambda x: -x[1]))
    return f"not listed (extension not in index.extensions): {kinds}"


def print_failures(rows: Iterable[dict[str, Any]]) -> None:
    """The first failing files: ``uri``, ``error_type``, ``message``."""
    for row in itertools.islice(rows, FAILURES_SHOWN):
        print(f"    {row['uri']}: {row['error_type']}: {row['message']}")


@command(
    "index",
    "list an image source and index its images (content ids, sizes, errors)",
    IMAGES,
    IMAGE_ROOT,
)
def cmd_index(args: argparse.Namespace, common: Common) -> int:
    check_source(args.images, common.storage_options)
    from fmbseg.flows.index import index_flow
    from fmbseg.tasks.annotate.index import STAGE

    started = now()  # in the manifests' format: a cache hit was committed before it
    with progress_bars():
        fp = index_flow(images=args.images, **common.flow_args(), image_root=args.image_root)
    store = common.open_store()
    m = store.require_manifest(STAGE, fp)
    by_type = m.meta.get("errors_by_type", {})
    cached = " (cache hit: already indexed)" if m.committed_at < started else ""
    details = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
    print(
        f"index: {m.rows} images, {m.error_rows} errors, {by_type.get('duplicate', 0)} "
        f"duplicates{cached}"
    )
    if details:
        print(f"  errors by type: {details}")
    if skipped := m.meta.get("skipped_extensions"):
        print(f"  {skipped_files(skipped)}")
    if m.error_rows:
        columns = ["uri", "error_type", "message"]
        tables = store.shards(STAGE, fp, "errors", manifest=m, columns=columns)
        rows = (r for t in tables if t.num_columns for r in t.slice(0, FAILURES_SHOWN).to_pylist())
        print_failures(rows)
    print(f"  fingerprint: {fp}")
    print(f"  output:      {store.stage_url(STAGE, fp)}")
    return 0
