"""The evaluation stages, declared once for the engine (:mod:`fmbseg.engine.stage`).

What the user chose travels in ``StageRun.given``: an
:class:`~fmbseg.tasks.evaluate.stage.EvalPlan` (the split and the resolved model) or a
:class:`~fmbseg.tasks.evaluate.label_quality_stage.LabelsPlan` (the split; the merge output
scored is the stage's input ``merge``).

Fingerprints:

- ``evaluate`` = hash(name, version, dataset name, data root, the evaluated samples (ids,
  and each image and label file's size and ETag or mtime: a file edited in place is
  evaluated again), ``limit``, the ``evaluate`` config without ``batch_size``, the model
  identity). A registry model's identity is its resolved ``name`` + ``version`` (never the
  word "champion"); a baseline's is its mode and CLIP weights.
- ``label_quality`` = hash(name, version, dataset name, data root, sample ids and each
  label file's size and ETag or mtime, ``limit``; input: the ``merge`` fingerprint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fmbseg.config import Config
from fmbseg.data.datasets import DatasetError, SegDataset, open_dataset
from fmbseg.engine.stage import Stage, StageRun, plan
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.evaluate import label_quality_stage as lq
from fmbseg.tasks.evaluate import stage as ev
from fmbseg.tasks.evaluate.protocol import evaluate_config


def _evaluate_parts(job: StageRun) -> dict[str, Any]:
    given: ev.EvalPlan = job.given
    protocol = dataclasses.asdict(evaluate_config(job.cfg))
    protocol.pop("batch_size")  # how many windows per forward pass: same numbers
    return {
        "dataset": given.dataset.name,
        "data_root": given.data_root,
        "samples": given.dataset.files_digest(),
        "limit": given.limit,
        "evaluate": protocol,
        "model": given.model.identity(),
    }


def _label_quality_parts(job: StageRun) -> dict[str, Any]:
    given: lq.LabelsPlan = job.given
    return {
        "dataset": given.dataset.name,
        "data_root": given.data_root,
        "samples": given.dataset.files_digest(images=False),  # no image is scored
        "limit": given.limit,
    }


EVALUATE = Stage(
    ev.STAGE, ev.CODE_VERSION, inputs=(), parts=_evaluate_parts, prepare=ev.prepare, gpu=True
)
LABEL_QUALITY = Stage(
    lq.STAGE,
    lq.CODE_VERSION,
    inputs=(lq.MERGE_STAGE,),
    parts=_label_quality_parts,
    prepare=lq.prepare,
)


def _split(
    dataset: str, data_root: str, limit: int | None, storage_options: dict[str, Any] | None
) -> SegDataset:
    """The split's first ``limit`` samples (all when None); lists files, reads no image."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1 image, got {limit}")
    ds = open_dataset(dataset, data_root, storage_options)
    return ds.subset(range(limit)) if limit is not None and limit < len(ds) else ds


def _planned(stage: Stage, job: StageRun) -> StageRun:
    return dataclasses.replace(job, fps=plan((stage,), job))


def plan_evaluation(
    store: ArtifactStore,
    dataset: str,
    data_root: str,
    model: str,
    cfg: Config,
    *,
    limit: int | None = None,
    model_name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StageRun:
    """The run of :data:`EVALUATE` for ``model`` (see
    :func:`~fmbseg.tasks.evaluate.stage.resolve_model`) on ``dataset``'s split under
    ``data_root``, its fingerprint planned.

    Raises ``DatasetError`` (unknown name, incomplete root, ``limit`` < 1) or
    ``ModelNotFoundError``.
    """
    split = _split(dataset, data_root, limit, storage_options)
    given = ev.EvalPlan(split, data_root, limit, ev.resolve_model(store, model, cfg, model_name))
    return _planned(
        EVALUATE, StageRun(store, cfg, {}, storage_options=storage_options, given=given)
    )


def plan_label_quality(
    store: ArtifactStore,
    dataset: str,
    data_root: str,
    labels: str,
    cfg: Config,
    *,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StageRun:
    """The run of :data:`LABEL_QUALITY` scoring the merge output ``labels`` (a fingerprint
    or ``latest``) on ``dataset``'s split, its fingerprint planned.

    Raises ``DatasetError`` or ``NotCommittedError`` (no such merge output).
    """
    split = _split(dataset, data_root, limit, storage_options)
    merge_fp = lq.resolve_labels(store, labels)
    given = lq.LabelsPlan(split, data_root, limit, lq.locate_records(store, merge_fp))
    job = StageRun(
        store, cfg, {lq.MERGE_STAGE: merge_fp}, storage_options=storage_options, given=given
    )
    return _planned(LABEL_QUALITY, job)
