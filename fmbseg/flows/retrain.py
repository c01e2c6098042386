"""Flow ``retrain``: scheduled incremental retraining on the images that arrived since last time.

find new images (source listing minus the ledger's batches, :mod:`fmbseg.tasks.train.ledger`) ->
annotate only those (one more batch; stages cached by fingerprint) -> record the batch ->
train on the union of every batch's labels (from scratch, or fine-tuned from the champion)
-> evaluate the new version and the champion on the held-out set -> promote by the rule of
:mod:`fmbseg.tasks.train.promotion`. Nothing new (and a model already trained on every batch):
the run records "nothing new" and trains nothing.

Earlier batches are relabelled only when their labels for the current vocabulary and config
are not committed (a changed class list or SAM threshold); otherwise their merge outputs
are reused as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow, task

import fmbseg.tasks.train.ledger as ledger_
from fmbseg.config import Config, ConfigError
from fmbseg.data.vocab import MAX_LABEL_CLASSES, resolve_vocabulary
from fmbseg.flows.annotate import label_index
from fmbseg.flows.annotate_and_train import Promotion, evaluate_and_promote
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    PLANNING_TASK,
    configure,
    current_flow_run_id,
    flow_lineage,
    open_store,
    summary_rows,
    table_artifact,
)
from fmbseg.flows.index import index_listing
from fmbseg.flows.train import TrainedModel, model_summary, train_passes
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.stages import check_teacher
from fmbseg.tasks.train.ledger import new_images_plan
from fmbseg.tasks.train.run import STAGE as TRAIN_STAGE
from fmbseg.tasks.train.sets import LabelSet, finetune_init
from fmbseg.tasks.train.stages import train_run

MODES = ("scratch", "finetune")


@dataclass(frozen=True)
class RetrainResult:
    """What :func:`retrain_flow` returns: what was new, what was trained, the decision."""

    listed: int  # images the source listed
    new_images: int  # of those, images no earlier batch covers
    annotated: int  # images indexed (and labelled) as this run's batch
    batch: int | None  # this run's batch number (None: nothing new)
    batches: int  # batches in the ledger, this one included
    fingerprints: dict[str, str]  # {stage: fp} of this run's batch ({}: nothing new)
    model: TrainedModel | None  # the version trained on every batch (None: none trained)
    evaluation: Promotion | None  # its held-out scores and the decision (None: none trained)
    reason: str  # why it was (not) promoted, or why nothing was trained

    @property
    def trained(self) -> bool:
        """Whether this run trained a model version."""
        return self.model is not None

    @property
    def promoted(self) -> bool | None:
        """Whether the new version became the champion (None: none trained)."""
        return None if self.evaluation is None else self.evaluation.promoted

    def rows(self) -> list[dict[str, Any]]:
        """The ``retrain-summary`` table: new images, the model trained, the decision."""
        return summary_rows(
            {
                "images listed": str(self.listed),
                "new images found": str(self.new_images),
                "annotated (indexed)": str(self.annotated),
                "model version": self.model.ref if self.model else "none (not retrained)",
                "promoted": str(self.promoted),
                "reason": self.reason,
            }
        )


# the source's listing and an index plan of the images no recorded batch covers
find_new_images_task = task(name="find-new-images", **PLANNING_TASK)(new_images_plan)


def training_key(
    store: ArtifactStore, cfg: Config, sets: list[LabelSet], vocabulary: tuple[str, ...]
) -> str:
    """What a model line's training depends on, the initial model aside: the from-scratch
    train fingerprint of ``sets`` (so a fine-tuned version is as up to date)."""
    return train_run(store, cfg, sets, vocabulary).fp(TRAIN_STAGE)


def up_to_date(
    registry: ModelRegistry,
    name: str,
    ledger: dict[str, Any],
    cfg: Config,
    vocabulary: tuple[str, ...],
) -> str | None:
    """The version last trained on every batch, with this vocabulary and config, whose
    promotion is decided; None when there is none (then the flow trains)."""
    if not ledger["models"] or ledger["models"][-1]["version"] not in registry.versions(name):
        return None
    last = ledger["models"][-1]
    sets = ledger_.batch_label_sets(cfg, ledger["batches"], vocabulary)
    if last.get("key") != training_key(registry.store, cfg, sets, vocabulary):
        return None
    return last["version"] if "promotion" in registry.card(name, last["version"]) else None


@flow(name="retrain", **LINEAGE_HOOKS)
def retrain_flow(
    images: str,
    store: str = "./fmbseg-store",
    classes: str | list[str] | None = None,
    vocab: str | None = None,
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    mode: Literal["scratch", "finetune"] = "scratch",
    eval_dataset: str | None = None,
    eval_data_root: str | None = None,
    eval_limit: int | None = None,
) -> RetrainResult:
    """Annotate the images of ``images`` not seen by earlier runs, retrain, maybe promote.

    Args:
        mode: ``scratch`` (train anew on every batch) or ``finetune`` (start from the
            champion's weights; the first model is trained from scratch).
        eval_dataset, eval_data_root: the held-out set (e.g. ``folder`` and its root, see
            :mod:`fmbseg.data.folder_dataset`); without it only a first model is promoted.
    """
    # bad input fails before any work, more classes than a label map holds included
    vocabulary = resolve_vocabulary(classes, vocab, max_names=MAX_LABEL_CLASSES)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if (eval_dataset is None) != (eval_data_root is None):
        raise ValueError("give both eval_dataset and eval_data_root, or neither")
    cfg = configure(config, overrides, ray_address)
    check_teacher(cfg, also=("clip", "dino"), storage_options=storage_options)
    common: dict[str, Any] = dict(
        config=config, overrides=overrides, ray_address=ray_address, storage_options=storage_options
    )
    st = open_store(store, storage_options)
    registry, name = ModelRegistry(st), cfg.train.model_name
    ledger = ledger_.read_ledger(st, name)
    found = find_new_images_task(st, images, cfg, ledger["batches"], storage_options, image_root)
    fps: dict[str, str] = {}
    annotated, batch = 0, None
    if found.plan is not None:
        index_fp = index_listing(st, cfg, found.plan, storage_options)
        fps.update(label_index(st, cfg, index_fp, vocabulary, storage_options))
        annotated = st.require_manifest("index", fps["index"]).rows
        ledger = ledger_.append_batch(
            st,
            name,
            {
                "index": fps["index"],
                "merge": fps["merge"],
                "source": images,
                "listed": found.new,
                "images": annotated,
                "vocabulary": list(vocabulary),
                "flow_run": current_flow_run_id(),
            },
        )
        batch = next(b["batch"] for b in ledger["batches"] if b["index"] == fps["index"])
    batches = len(ledger["batches"])
    current = None if found.plan else up_to_date(registry, name, ledger, cfg, vocabulary)
    model: TrainedModel | None = None
    evaluation: Promotion | None = None
    if not ledger["batches"]:
        reason = f"no images under {images}: nothing to annotate or train"
    elif current is not None:
        reason = (
            f"nothing new: {name}:{current} is trained on all {batches} "
            "batches with this vocabulary and config"
        )
    else:
        model, evaluation = _train_and_decide(
            st,
            cfg,
            name,
            ledger,
            vocabulary,
            mode,
            common,
            store,
            eval_dataset,
            eval_data_root,
            eval_limit,
        )
        reason = evaluation.reason
    out = RetrainResult(
        listed=found.listed,
        new_images=found.new,
        annotated=annotated,
        batch=batch,
        batches=batches,
        fingerprints=fps,
        model=model,
        evaluation=evaluation,
        reason=reason,
    )
    ledger_.append(
        st,
        name,
        "runs",
        {
            "new_images": found.new,
            "annotated": annotated,
            "batch": batch,
            "version": None if model is None else model.version,
            "promoted": out.promoted,
            "reason": reason,
            "flow_run": current_flow_run_id(),
        },
    )
    table_artifact(
        "retrain-summary",
        out.rows(),
        description="retrain: new images, the model trained on all batches, the decision",
    )
    flow_lineage(
        st,
        "retrain",
        images=images,
        vocabulary=list(vocabulary),
        mode=mode,
        config=cfg.to_dict(),
        stages=fps,
        batches=ledger["batches"],
        model=None if model is None else {"name": name, "version": model.version},
        evaluation=None if evaluation is None else evaluation.to_dict(),
        reason=reason,
    )
    return out


def _train_and_decide(
    st: ArtifactStore,
    cfg: Config,
    name: str,
    ledger: dict[str, Any],
    vocabulary: tuple[str, ...],
    mode: str,
    common: dict[str, Any],
    store: str,
    eval_dataset: str | None,
    eval_data_root: str | None,
    eval_limit: int | None,
) -> tuple[TrainedModel, Promotion]:
    """Train on every batch, record what it was trained on, evaluate, decide promotion."""
    registry = ModelRegistry(st)
    sets = ledger_.batch_label_sets(cfg, ledger["batches"], vocabulary)
    for merge, index in sets:  # labels for this vocabulary and config made again (cached)
        if not st.is_committed("merge", merge):
            label_index(st, cfg, index, vocabulary, common["storage_options"])
    init = finetune_init(registry, name, mode)
    job = train_run(st, cfg, sets, vocabulary, init)
    train_passes(job)
    model = model_summary(st, job.fp(TRAIN_STAGE))
    version = model.version
    numbers = [b["batch"] for b in ledger["batches"]]
    registry.update_card(
        name,
        version,
        {
            "retrain": {
                "mode": mode,
                "init_from": init,
                "batches": [
                    {**{k: b[k] for k in ("batch", "index", "images", "source")}, "merge": s[0]}
                    for b, s in zip(ledger["batches"], sets, strict=True)
                ],
                "images": sum(b["images"] for b in ledger["batches"]),
                "new_batch": numbers[-1],
                "new_images": ledger["batches"][-1]["images"],
            }
        },
    )
    evaluation = evaluate_and_promote(
        store, name, version, common, eval_dataset, eval_data_root, eval_limit, {"retrain": True}
    )
    ledger_.append(
        st,
        name,
        "models",
        {
            "version": version,
            "batches": numbers,
            "mode": mode,
            "init_from": init,
            "key": training_key(st, cfg, sets, vocabulary),
            "promoted": evaluation.promoted,
            "reason": evaluation.reason,
        },
    )
    return model, evaluation
