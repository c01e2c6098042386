"""Stage 2's stages, declared once for the engine (:mod:`fmbseg.engine.stage`).

``dino_features`` is sharded (one run per label set's index); ``train`` is one process's
epoch loop (:func:`fmbseg.tasks.train.run.train`) that commits its own output. What the user
chose (the label sets, fine-tuning's initial model, prebuilt test models) is the runs'
``given`` (:class:`~fmbseg.tasks.train.sets.Training`), the class names their
``vocabulary``. Execution-only fields (``train.num_loader_workers``, the runtime) are left
out of the fingerprints, so changing them reuses committed outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from fmbseg.config import Config, to_dict
from fmbseg.engine.runner import Progress
from fmbseg.engine.stage import Stage, StageRun, committed, plan, run
from fmbseg.models.base import DenseClip, PatchEncoder
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.common import INDEX_STAGE
from fmbseg.tasks.train import features
from fmbseg.tasks.train.data import vocabulary_names
from fmbseg.tasks.train.run import STAGE as TRAIN_STAGE
from fmbseg.tasks.train.run import train
from fmbseg.tasks.train.sets import LabelSet, Training, label_sets


def feature_runs(job: StageRun) -> list[StageRun]:
    """One planned ``dino_features`` run per label set of the training run ``job``."""
    runs = [dataclasses.replace(job, fps={INDEX_STAGE: ifp}) for _, ifp in job.given.sets]
    return [dataclasses.replace(r, fps=plan((DINO_FEATURES,), r)) for r in runs]


def features_first(job: StageRun) -> list[StageRun]:
    """The feature caches the flows run as passes of their own before ``train``: each
    label set's (:func:`feature_runs`) with ``train.cache_features``; none once ``train``
    is committed (it reads no features then)."""
    if not job.cfg.train.cache_features or committed(TRAIN, job) is not None:
        return []
    return feature_runs(job)


def _features(job: StageRun) -> list[str]:
    """Run the feature cache of each label set not yet committed (the flows run them as
    their own tasks first: reused silently here); their fingerprints."""
    runs = feature_runs(job)
    for r in runs:
        if committed(DINO_FEATURES, r) is None:
            run((DINO_FEATURES,), r)
    return [r.fp(DINO_FEATURES.name) for r in runs]


def _train_parts(job: StageRun) -> dict[str, Any]:
    cfg, given = job.cfg, job.given
    return {
        "train": {k: v for k, v in to_dict(cfg.train).items() if k != "num_loader_workers"},
        "encoder": given.encoder_name(cfg),
        "encoder_weights": cfg.models.dino_weights,
        "text": given.text_name(cfg),
        "text_weights": cfg.models.clip_weights,
    }


DINO_FEATURES = Stage(
    features.STAGE,
    "2",  # 2: short-side resize + crops, one row per crop (1: squash)
    inputs=(INDEX_STAGE,),
    parts=features.parts,
    prepare=features.prepare,
    gpu=True,
)
TRAIN = Stage(
    TRAIN_STAGE,
    "2",  # 2: short-side resize + crops (train_crops); 1: whole image squashed
    inputs=(),
    parts=_train_parts,
    body=functools.partial(train, features=_features),
    named=lambda job: job.given.inputs(job.vocabulary),  # label sets, init, vocabulary
    unit="epochs",
)


def train_run(
    store: ArtifactStore,
    cfg: Config,
    sets: Sequence[LabelSet],
    vocabulary: Sequence[str],
    init: str | None = None,
    *,
    encoder: PatchEncoder | None = None,
    text_model: DenseClip | None = None,
) -> StageRun:
    """A training run on the label ``sets`` (oldest first) with its fingerprint planned;
    ``init``: the ``name:version`` fine-tuning starts from."""
    given = Training(tuple(label_sets(sets, None)), init, encoder, text_model)
    job = StageRun(store, cfg, {}, tuple(vocabulary), given=given)
    return dataclasses.replace(job, fps=plan((TRAIN,), job))


def run_train(
    store: ArtifactStore,
    cfg: Config,
    labels_fp: str | Sequence[LabelSet],
    index_fp: str | None,
    vocab: Any,
    *,
    progress: Progress | None = None,
    encoder: PatchEncoder | None = None,
    text_model: DenseClip | None = None,
    init_from: str | None = None,
) -> tuple[str, str]:
    """Train (or reuse) the alignment module on merge-stage pseudo-labels; returns (model
    name, version).

    Args:
        store: artifact store holding the merge output ``labels_fp`` and index ``index_fp``.
        cfg: the whole config (``train``, ``models``, ``runtime`` sections are read).
        labels_fp, index_fp: one label set, or ``labels_fp`` = several ``(labels_fp,
            index_fp)`` pairs (oldest first) and ``index_fp=None``: trained on their union
            (:mod:`fmbseg.tasks.train.sets`).
        vocab: the class names the pseudo-labels were made with (``category_id`` = position),
            a list of strings or an object with ``.names``.
        progress: ``progress(done, total)`` in epochs (see :func:`~fmbseg.tasks.train.run.train`).
        encoder, text_model: prebuilt models (tests); default: built from ``cfg.models``.
        init_from: a registry reference (``champion``, ``name:vNNNN``) whose weights training
            starts from (fine-tuning); its module must fit this config's.
    """
    names = vocabulary_names(vocab)
    sets = label_sets(labels_fp, index_fp)
    init = None
    if init_from:
        ref = ModelRegistry(store).resolve(init_from, cfg.train.model_name)
        init = f"{ref.name}:{ref.version}"
    job = train_run(store, cfg, sets, names, init, encoder=encoder, text_model=text_model)
    run((TRAIN,), job, None if progress is None else {TRAIN.name: progress})
    meta = store.require_manifest(TRAIN.name, job.fp(TRAIN.name)).meta
    return meta["model"], meta["version"]
