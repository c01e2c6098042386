"""The retraining ledger: which images a model line has already annotated, batch by batch.

``{store}/retrain/{model_name}/ledger.json``::

    {"model": name,
     "batches": [{"batch": 1, "index": fp, "merge": fp, "source": uri, "listed": n,
                  "images": indexed, "vocabulary": [...], "at": time, "flow_run": id}, ...],
     "models":  [{"version": "v0002", "batches": [1, 2], "mode": "scratch", "init_from": None,
                  "key": training key, "promoted": bool, "reason": str, "at": time}, ...],
     "runs":    [{"at": time, "new_images": 0, "outcome": "nothing new", ...}, ...]}

A batch is appended only once its ``merge`` output is committed. A run that crashes before
that leaves no entry; its rerun lists the same new images, so it plans the same index
fingerprint and every stage it had committed is a cache hit: no image is labelled twice.

An image counts as covered when its URI was listed by a recorded batch: the URIs of the
batch's ``index`` records and of its ``index`` errors (unreadable or duplicate files are not
retried every run). An image whose bytes equal an earlier batch's image under a new URI is
annotated again; training keeps one copy (:func:`fmbseg.tasks.train.sets.unite`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fmbseg.config import Config
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.index import STAGE as INDEX_STAGE
from fmbseg.tasks.annotate.index import IndexPlan, listed_plan, plan_index
from fmbseg.tasks.annotate.stages import stage1_fingerprints
from fmbseg.tasks.train.sets import LabelSet

MAX_RUNS = 200  # "runs" keeps the most recent entries only (the batches and models all)


def ledger_rel(model_name: str) -> str:
    return f"retrain/{model_name}/ledger.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_ledger(store: ArtifactStore, model_name: str) -> dict[str, Any]:
    """The ledger of ``model_name`` (an empty one when none was written yet)."""
    rel = ledger_rel(model_name)
    if not store.exists(rel):
        return {"model": model_name, "batches": [], "models": [], "runs": []}
    ledger = store.read_json(rel)
    for key in ("batches", "models", "runs"):
        ledger.setdefault(key, [])
    return ledger


def append(store: ArtifactStore, model_name: str, key: str, entry: dict[str, Any]) -> dict:
    """Record ``entry`` (stamped ``at``) under ``key``: ``batches`` (:func:`append_batch`),
    ``models`` (a trained version and its promotion decision) or ``runs`` (what one retrain
    run did). Returns the ledger."""
    ledger = read_ledger(store, model_name)
    entries = [*ledger[key], {**entry, "at": now()}]
    ledger[key] = entries[-MAX_RUNS:] if key == "runs" else entries
    store.write_json(ledger_rel(model_name), ledger)
    return ledger


def append_batch(store: ArtifactStore, model_name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Record a batch whose merge is committed; numbered after the last one. Idempotent:
    a batch with the same index fingerprint is not recorded twice. Returns the ledger."""
    ledger = read_ledger(store, model_name)
    if any(b["index"] == entry["index"] for b in ledger["batches"]):
        return ledger
    number = max((b["batch"] for b in ledger["batches"]), default=0) + 1
    return append(store, model_name, "batches", {**entry, "batch": number})


def covered_uris(store: ArtifactStore, batches: Sequence[dict[str, Any]]) -> set[str]:
    """Every URI listed by a recorded batch (its index records and index errors)."""
    covered: set[str] = set()
    for batch in batches:
        for kind in ("part", "errors"):
            table = store.read_table(INDEX_STAGE, batch["index"], kind)
            if table.num_rows:
                covered.update(table.column("uri").to_pylist())
    return covered


def batch_label_sets(
    cfg: Config, batches: Sequence[dict[str, Any]], vocabulary: tuple[str, ...]
) -> list[LabelSet]:
    """(merge fp, index fp) of every batch's labels for this vocabulary and config, oldest
    first (planned: committed or not; an earlier batch is relabelled when not)."""
    return [
        (stage1_fingerprints(cfg, b["index"], vocabulary)["merge"], b["index"]) for b in batches
    ]


@dataclass(frozen=True)
class NewImages:
    """What a retrain run found: ``listed`` images under the source, ``covered`` of them in
    earlier batches, and the index plan of the rest (None when there is nothing new)."""

    listed: int
    covered: int
    plan: IndexPlan | None

    @property
    def new(self) -> int:
        return 0 if self.plan is None else len(self.plan.refs)


def new_images_plan(
    store: ArtifactStore,
    source: str,
    cfg: Config,
    batches: Sequence[dict[str, Any]],
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
) -> NewImages:
    """List ``source`` and plan an index of only the images no batch has covered.

    The plan's fingerprint is that of an index of the new refs alone, so the same
    new images always give the same index (a rerun after a crash is a cache hit).
    """
    full = plan_index(source, cfg, storage_options, image_root, store.uri)
    covered = covered_uris(store, batches)
    refs = tuple(r for r in full.refs if r.uri not in covered)
    plan = listed_plan(full.source, refs, cfg, full.root) if refs else None
    return NewImages(len(full.refs), len(full.refs) - len(refs), plan)
