"""``--dry-run``: the stages a flow would run, planned the way the flow plans them, run never.

Each stage's fingerprint comes from its config and its inputs' fingerprints, so the whole
chain is known before anything runs: the index's from the source listing (names and sizes;
no image is decoded), every later one from the index's (``stage1_fingerprints``,
``train_run``). The store is only read (manifests, receipts, the retrain ledger):
no model is loaded, no Prefect run is made, nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fmbseg.tasks.train.ledger as ledger_
from fmbseg.config import Config
from fmbseg.data.image_labels import ImageLabels
from fmbseg.engine.runner import plan_shards
from fmbseg.flows.train import resolve_labels
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.index import IndexPlan, plan_index
from fmbseg.tasks.annotate.stages import stage1, stage1_fingerprints
from fmbseg.tasks.train.ledger import new_images_plan
from fmbseg.tasks.train.run import STAGE as TRAIN_STAGE
from fmbseg.tasks.train.sets import LabelSet, finetune_init
from fmbseg.tasks.train.stages import DINO_FEATURES, features_first, train_run


@dataclass(frozen=True)
class StagePlan:
    """One stage a run would reach: its fingerprint, whether it is committed, what is left.

    ``shards``/``remaining``: shards in all and shards without a receipt (None for
    ``train``, which counts epochs: ``epochs``)."""

    stage: str
    fingerprint: str
    committed: bool
    shards: int | None = None
    remaining: int | None = None
    epochs: int | None = None

    def line(self) -> str:
        state = "committed" if self.committed else "not committed"
        if self.shards is not None:
            todo = f"{self.remaining} of {self.shards} shards to run"
        else:
            todo = f"{0 if self.committed else self.epochs} epochs to run"
        return f"{self.stage}: fingerprint {self.fingerprint}, {state}, {todo}"


def _labelling(cfg: Config) -> list[str]:
    """The declared stage-1 stages of ``cfg``'s teacher, in order."""
    return [s.name for s in stage1(cfg)]


def sharded(store: ArtifactStore, stage: str, fp: str, shards: int) -> StagePlan:
    """A sharded stage: committed (nothing left), or the shards with no receipt yet."""
    if store.is_committed(stage, fp):
        return StagePlan(stage, fp, True, shards, 0)
    done = set(store.shard_receipts(stage, fp)) & set(range(shards))
    return StagePlan(stage, fp, False, shards, shards - len(done))


def index_plans(
    store: ArtifactStore,
    cfg: Config,
    plan: IndexPlan,
    vocabulary: tuple[str, ...],
    image_labels: ImageLabels | None = None,
) -> list[StagePlan]:
    """index and every stage-1 stage after it on the listed ``plan`` (shard ``i`` of each
    stage holds the images of the index's shard ``i``, so all count the same shards)."""
    shards = len(plan_shards(len(plan.refs), plan.shard_size))
    fps = {
        "index": plan.fingerprint,
        **stage1_fingerprints(cfg, plan.fingerprint, vocabulary, image_labels),
    }
    return [sharded(store, stage, fps[stage], shards) for stage in ("index", *_labelling(cfg))]


def train_plan(
    store: ArtifactStore,
    cfg: Config,
    sets: list[LabelSet],
    vocabulary: tuple[str, ...],
    init: str | None = None,
    listed: dict[str, int] | None = None,
) -> list[StagePlan]:
    """``train`` on the label ``sets`` (``init``: the ``name:version`` it fine-tunes), after
    each set's ``dino_features`` while training is still to run. A feature cache has a
    shard per ``runtime.shard_size`` of its index's images: a committed index's count, else
    ``listed[index fingerprint]`` (the images listed for it, before duplicates are dropped)."""
    job = train_run(store, cfg, sets, vocabulary, init)
    plans = []
    for run in features_first(job):
        index = store.manifest("index", run.fp("index"))
        images = index.rows if index is not None else (listed or {})[run.fp("index")]
        shards = len(plan_shards(images, cfg.runtime.shard_size))
        plans.append(sharded(store, DINO_FEATURES.name, run.fp(DINO_FEATURES.name), shards))
    fp = job.fp(TRAIN_STAGE)
    done = store.is_committed(TRAIN_STAGE, fp)
    return [*plans, StagePlan(TRAIN_STAGE, fp, done, epochs=cfg.train.epochs)]


def annotate_dry_run(
    store: ArtifactStore,
    cfg: Config,
    images: str,
    vocabulary: tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    image_labels: ImageLabels | None = None,
) -> list[StagePlan]:
    """``annotate``'s stages (``run`` adds :func:`train_plan` on its labels)."""
    return index_plans(
        store,
        cfg,
        plan_index(images, cfg, storage_options, image_root, store.uri),
        vocabulary,
        image_labels,
    )


def run_dry_run(
    store: ArtifactStore,
    cfg: Config,
    images: str,
    vocabulary: tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
) -> list[StagePlan]:
    """``run`` (annotate-and-train): the annotate stages, then train on their labels."""
    plan = plan_index(images, cfg, storage_options, image_root, store.uri)
    plans = index_plans(store, cfg, plan, vocabulary)
    fps = {p.stage: p.fingerprint for p in plans}
    listed = {plan.fingerprint: len(plan.refs)}
    return [
        *plans,
        *train_plan(store, cfg, [(fps["merge"], fps["index"])], vocabulary, None, listed),
    ]


def train_dry_run(store: ArtifactStore, cfg: Config, labels: str) -> list[StagePlan]:
    """``train``: the committed labels ``labels`` (a merge fingerprint or ``latest``)."""
    inputs = resolve_labels(store, labels)
    return train_plan(store, cfg, [(inputs.labels_fp, inputs.index_fp)], inputs.vocabulary)


def retrain_dry_run(
    store: ArtifactStore,
    cfg: Config,
    images: str,
    vocabulary: tuple[str, ...],
    mode: str,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
) -> list[StagePlan]:
    """``retrain``: the new images' batch (when there are new images) through stage 1, the
    labels of earlier batches not committed for this vocabulary and config, then train on
    every batch (``finetune``: from the champion)."""
    name = cfg.train.model_name
    batches = ledger_.read_ledger(store, name)["batches"]
    found = new_images_plan(store, images, cfg, batches, storage_options, image_root)
    plans: list[StagePlan] = []
    sets = ledger_.batch_label_sets(cfg, batches, vocabulary)
    for merge, index in sets:
        if not store.is_committed("merge", merge):  # relabelled on the committed index
            fps = stage1_fingerprints(cfg, index, vocabulary)
            shards = store.require_manifest("index", index).num_shards
            plans += [sharded(store, s, fps[s], shards) for s in _labelling(cfg)]
    listed = {}
    if found.plan is not None:
        listed[found.plan.fingerprint] = len(found.plan.refs)
        new = index_plans(store, cfg, found.plan, vocabulary)
        plans += new
        fps = {p.stage: p.fingerprint for p in new}
        sets.append((fps["merge"], fps["index"]))
    if not sets:
        return plans
    init = finetune_init(ModelRegistry(store), name, mode)
    return [*plans, *train_plan(store, cfg, sets, vocabulary, init, listed)]


def print_plans(command: str, plans: list[StagePlan]) -> None:
    """The CLI's dry-run report: one line per stage, then the totals."""
    print(f"{command} --dry-run: nothing is run or written")
    for p in plans:
        print(f"  {p.line()}")
    left = [p.stage for p in plans if not p.committed]
    print(f"  {len(left)} of {len(plans)} stages to run{': ' + ', '.join(left) if left else ''}")
