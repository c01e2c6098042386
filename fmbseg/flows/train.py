"""Flow ``train``: stage 2 on committed pseudo-labels -> a model version in the registry.

The labels are a committed ``merge`` output (its fingerprint, or ``"latest"``: the most
recently committed one). Its manifest records the lineage training needs: the index
fingerprint (meta ``index``) and the vocabulary the labels were made with (meta
``vocabulary``; ``category_id`` = position). Training is the declared stages of
:mod:`fmbseg.tasks.train.stages`, each pass a Prefect task: the feature cache, then the
training loop. A second run with the same labels and config is a cache hit that returns
the model version already in the registry and trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from fmbseg.engine.stage import StageRun
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    configure,
    current_flow_run_id,
    flow_lineage,
    image_markdown,
    markdown_artifact,
    open_store,
    pass_task,
    table_artifact,
)
from fmbseg.models.locate import locate_weights
from fmbseg.storage.fingerprint import check_fingerprint
from fmbseg.storage.models import CARD, WEIGHTS, ModelRegistry
from fmbseg.storage.store import ArtifactStore, NotCommittedError
from fmbseg.tasks.annotate.common import VOCABULARY_KEY
from fmbseg.tasks.train.features import STAGE as FEATURES_STAGE
from fmbseg.tasks.train.promotion import promote_if_first
from fmbseg.tasks.train.run import LABELS_STAGE, STAGE
from fmbseg.tasks.train.stages import DINO_FEATURES, TRAIN, features_first, train_run

LOSS_CURVE = "loss_curve.png"  # the file run_train saves beside the weights
# the ``train-model`` table's columns after ``model`` (the name)
MODEL_COLUMNS = (
    "version",
    "labels",
    "index",
    "train_fp",
    "images",
    "final_loss",
    "card",
    "weights",
    "loss_curve",
)


@dataclass(frozen=True)
class TrainInputs:
    """What one training run reads: the labels, the index they cover, their class names."""

    labels_fp: str
    index_fp: str
    vocabulary: tuple[str, ...]


def resolve_labels(store: ArtifactStore, labels: str) -> TrainInputs:
    """``labels`` (a merge fingerprint or ``"latest"``) -> its committed lineage.

    Raises:
        NotCommittedError: no committed merge output ``labels`` (or none at all for latest).
        ValueError: the merge manifest does not record its index or vocabulary.
    """
    if labels == "latest":
        fp = store.latest(LABELS_STAGE)
        if fp is None:
            raise NotCommittedError(
                f"labels 'latest': no committed pseudo-labels (stage {LABELS_STAGE!r}) in "
                f"{store.uri}; run `fmbseg annotate` first"
            )
    else:
        fp = check_fingerprint(labels, "labels")
    manifest = store.manifest(LABELS_STAGE, fp)
    if manifest is None:
        known = store.committed_fingerprints(LABELS_STAGE)
        raise NotCommittedError(
            f"labels {fp!r}: no committed pseudo-labels (stage {LABELS_STAGE!r}) with this "
            f"fingerprint in {store.uri}; committed: {known or 'none'} (or pass 'latest')"
        )
    missing = [k for k in ("index", VOCABULARY_KEY) if k not in manifest.meta]
    if missing:
        raise ValueError(
            f"labels {fp!r}: the {LABELS_STAGE} manifest in {store.uri} does not record "
            f"{missing} (not written by fmbseg's merge stage?)"
        )
    return TrainInputs(fp, manifest.meta["index"], tuple(manifest.meta[VOCABULARY_KEY]))


# which merge output to train on, its index and vocabulary (reads one manifest)
resolve_labels_task = task(name="resolve-labels", cache_policy=NO_CACHE, persist_result=False)(
    resolve_labels
)


def train_passes(job: StageRun) -> None:
    """The planned training run ``job`` as Prefect tasks: each label set's feature cache
    (``dino_features``, progress in shards; not needed once ``train`` is committed), then
    the epochs (``train``)."""
    for features in features_first(job):
        pass_task((DINO_FEATURES,))(features)
    pass_task((TRAIN,))(job)


@dataclass(frozen=True)
class TrainedModel:
    """A model version committed by the train stage, as its card describes it."""

    name: str  # registry model name
    version: str  # its version, ``vNNNN``
    uri: str  # the version's folder in the store
    card: str  # URI of its model card (JSON)
    weights: str  # URI of its weights file
    loss_curve: str  # URI of its loss curve PNG
    train_fp: str  # fingerprint of the train stage that made it
    labels: str  # merge fingerprint of the (first) label set it was trained on
    index: str  # index fingerprint of that label set
    features: str | None  # dino_features fingerprint of that set (None: not cached)
    vocabulary: tuple[str, ...]  # class names; ``category_id`` = position
    images: int  # training images
    epoch_losses: tuple[float, ...]  # mean loss per epoch
    final_loss: float  # the last epoch's mean loss

    @property
    def ref(self) -> str:
        """``name:version``, as ``--model`` and the registry take it."""
        return f"{self.name}:{self.version}"

    def table_row(self) -> dict[str, Any]:
        """The ``train-model`` table's row."""
        return {"model": self.name, **{k: getattr(self, k) for k in MODEL_COLUMNS}}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_flow` returns."""

    model: TrainedModel  # the version trained (or found already trained)
    cached: bool  # True: this config had already trained on these labels, nothing retrained
    champion: str | None  # the name's champion version after this run (None: none yet)
    promoted: bool  # this run made the version the champion
    flow_run: str | None  # the Prefect flow run id (None outside a run)


def model_summary(store: ArtifactStore, fp: str) -> TrainedModel:
    """The model version committed as ``stages/train/{fp}``: name, version, URIs, losses."""
    meta = store.require_manifest(STAGE, fp).meta
    name, version = meta["model"], meta["version"]
    card = ModelRegistry(store).card(name, version)
    rel = ModelRegistry.rel(name, version)
    return TrainedModel(
        name=name,
        version=version,
        uri=store.url(rel),
        card=store.url(f"{rel}/{CARD}"),
        weights=store.url(f"{rel}/{WEIGHTS}"),
        loss_curve=store.url(f"{rel}/{_plain_file(card.get('loss_curve', LOSS_CURVE))}"),
        train_fp=fp,
        labels=card["data"]["labels_fp"],
        index=card["data"]["index_fp"],
        features=card["data"].get("features_fp"),
        vocabulary=tuple(card["vocabulary"]),
        images=card["data"]["images"],
        epoch_losses=tuple(card["epoch_losses"]),
        final_loss=card["metrics"]["final_loss"],
    )


def _plain_file(name: Any) -> str:
    """A file name a card gives for its folder; anything else (a path) -> the default."""
    ok = isinstance(name, str) and "/" not in name and "\\" not in name
    return name if ok and name not in ("", ".", "..") else LOSS_CURVE


def loss_markdown(model: TrainedModel, curve_png: bytes | None = None) -> str:
    """The loss curve (``curve_png`` embedded as an image, when given), per-epoch losses as a
    markdown table, and the curve's store URI."""
    lines = [
        f"### Stage-2 training loss: {model.ref}",
        "",
        *([image_markdown("loss curve", curve_png, "image/png"), ""] if curve_png else []),
        "| epoch | mean loss |",
        "|---:|---:|",
        *(f"| {i} | {loss:.4f} |" for i, loss in enumerate(model.epoch_losses, 1)),
        "",
        f"Loss curve (per step and per epoch): `{model.loss_curve}`",
    ]
    return "\n".join(lines)


@flow(name="train", **LINEAGE_HOOKS)
def train_flow(
    store: str = "./fmbseg-store",
    labels: str = "latest",
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    promote_first: bool = True,
) -> TrainResult:
    """Train the open-vocabulary segmenter on the pseudo-labels ``labels`` in ``store``.

    ``labels``: a merge-stage fingerprint or ``"latest"``. ``promote_first``: make the
    version the champion when its name has none yet (the registry's one rule; flows that
    decide promotion themselves pass False).
    """
    cfg = configure(config, overrides, ray_address)
    locate_weights(cfg.models, ("dino", "clip"), storage_options)
    st = open_store(store, storage_options)
    inputs = resolve_labels_task(st, labels)
    job = train_run(st, cfg, [(inputs.labels_fp, inputs.index_fp)], inputs.vocabulary)
    fp = job.fp(STAGE)
    cached = st.is_committed(STAGE, fp)
    train_passes(job)  # a cache hit trains nothing and reports no progress
    model = model_summary(st, fp)
    registry = ModelRegistry(st)
    promoted = promote_first and promote_if_first(registry, model.name, model.version)
    curve = ModelRegistry.rel(model.name, model.version, LOSS_CURVE)
    curve_png = st.read_bytes(curve) if st.exists(curve) else None
    markdown_artifact(
        "train-loss", loss_markdown(model, curve_png), description=f"loss of {model.ref}"
    )
    table_artifact("train-model", [model.table_row()], description=f"model version {model.ref}")
    stages = {LABELS_STAGE: inputs.labels_fp, "index": inputs.index_fp, STAGE: fp}
    if model.features:
        stages[FEATURES_STAGE] = model.features
    flow_lineage(
        st,
        "train",
        labels=labels,
        config=cfg.to_dict(),
        stages=stages,
        model={"name": model.name, "version": model.version, "card": model.card},
    )
    champion = registry.champion(model.name)
    return TrainResult(model, cached, champion, bool(promoted), current_flow_run_id())
