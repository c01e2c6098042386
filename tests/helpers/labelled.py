"""Stores holding pseudo-labels the way the merge stage commits them, for stage-2 flow tests.

:func:`labelled_world` builds the synthetic stage-2 world (``tests/helpers/world.py``) and
commits its pseudo-label records again as a `merge` output whose manifest records its
lineage (``index`` fingerprint and ``vocabulary``), as :func:`fmbseg.tasks.annotate.merge.run_merge`
writes it; the world's own `merge` output has no such meta.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from fmbseg.storage import ArtifactStore
from tests.helpers.synthetic import VOCAB
from tests.helpers.world import INDEX_FP, LABELS_FP, World, make_world

LABELS_A = "labelsa000000000"  # every training image's pseudo-labels
LABELS_B = "labelsb000000000"  # the first half of the images only (committed later)
OVERRIDES = [
    "runtime.executor=local",
    "runtime.shard_size=4",
    "train.lr=0.05",
    "train.epochs=2",
]


def commit_labels(store: ArtifactStore, fp: str, records: pa.Table, shard_size: int = 8) -> str:
    """Commit ``records`` as `merge` output ``fp`` with index + vocabulary lineage."""
    n = max(1, -(-records.num_rows // shard_size))
    for s in range(n):
        store.write_shard("merge", fp, s, records.slice(s * shard_size, shard_size))
    store.commit("merge", fp, n, meta={"vocabulary": list(VOCAB), "index": INDEX_FP})
    return fp


def labelled_world(root: Path, n_train: int = 8, second: bool = False) -> World:
    """The world with `merge` output LABELS_A (and, with ``second``, a later LABELS_B)."""
    world = make_world(root, n_train=n_train, n_held=2)
    records = world.store.read_table("merge", LABELS_FP)
    commit_labels(world.store, LABELS_A, records)
    if second:
        half = [sc.image_id for sc in world.train[: n_train // 2]]
        commit_labels(
            world.store, LABELS_B, records.filter(pc.is_in(records["image_id"], pa.array(half)))
        )
    return world
