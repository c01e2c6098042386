"""Stage ``evaluate``: the evaluation protocol fanned out over shards of a benchmark split.

Core (no Prefect, no Ray): :func:`evaluate_shard` runs the protocol of
:mod:`fmbseg.tasks.evaluate.protocol` over a slice of a :class:`~fmbseg.data.datasets.SegDataset`
and returns its :class:`ConfusionMatrix`; :func:`merge_confusions` adds shard matrices
(counts add, so the merge is exact); :func:`build_report` turns the merged matrix into the
report. Shell: :func:`prepare` (the shards and :class:`EvaluateWorker`, one per executor
slot, the model built once) for the stage declared in :mod:`fmbseg.tasks.evaluate.stages`,
and :func:`write_report`.

Output shard records (one row per shard, :data:`RECORD_SCHEMA`): ``shard`` [int32],
``images`` [int32] evaluated, ``seconds`` [float64] of protocol time, ``confusion``
[string] = ``json.dumps(ConfusionMatrix.to_dict())``. An image or label that cannot be read
is a row of the shard's errors table and is left out of the counts.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from fmbseg.config import Config
from fmbseg.data.datasets import DatasetError, SegDataset, dataset_description
from fmbseg.engine.runner import plan_shards
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.records import error_row, errors_table
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.evaluate.metrics import ConfusionMatrix
from fmbseg.tasks.evaluate.predictors import Predictor
from fmbseg.tasks.evaluate.protocol import (
    evaluate_config,
    metrics_report,
    plan_prompts,
    predict_label_map,
    protocol_report,
)

STAGE = "evaluate"
CODE_VERSION = "2"  # 2: unpadded windows on images smaller than a window (mmseg)
BASELINES = ("maskclip", "sclip")
RECORD_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32()),
        pa.field("images", pa.int32()),
        pa.field("seconds", pa.float64()),
        pa.field("confusion", pa.string()),
    ]
)


@dataclass(frozen=True)
class ModelSpec:
    """What is evaluated: a training-free baseline or a registry version.

    ``kind`` is ``"baseline"`` (``mode`` maskclip/sclip, CLIP from ``cfg.models``) or
    ``"registry"`` (``name``, ``version`` and ``uri`` of a resolved version).
    """

    kind: str
    mode: str | None = None
    name: str | None = None
    version: str | None = None
    uri: str | None = None
    clip: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How people name it: ``maskclip`` or ``name:vNNNN``."""
        return str(self.mode) if self.kind == "baseline" else f"{self.name}:{self.version}"

    def identity(self) -> dict[str, Any]:
        """What the results are a function of (the URI is not: a copied store is the same)."""
        if self.kind == "baseline":
            return {"kind": "baseline", "mode": self.mode, **self.clip}
        return {"kind": "registry", "name": self.name, "version": self.version}


def resolve_model(
    store: ArtifactStore, model: str, cfg: Config, model_name: str | None = None
) -> ModelSpec:
    """``maskclip`` | ``sclip`` | a registry reference (``champion``, ``latest``, ``vNNNN``,
    ``name:version``, a version folder URI) -> :class:`ModelSpec`.

    Raises ``ModelNotFoundError`` (from the registry) when a reference does not resolve.
    """
    if model in BASELINES:
        m = cfg.models
        clip = {
            "clip": m.clip,
            "clip_weights": m.clip_weights,
            "clip_quick_gelu": m.clip_quick_gelu,
            "precision": cfg.clip_dense.precision,  # bf16 autocast on GPU changes a few pixels
        }
        return ModelSpec("baseline", mode=model, clip=clip)
    ref = ModelRegistry(store).resolve(model, model_name or cfg.train.model_name)
    return ModelSpec("registry", name=ref.name, version=ref.version, uri=ref.uri)


def build_predictor(spec: ModelSpec, cfg: Config, store: ArtifactStore) -> Predictor:
    """The predictor of ``spec`` on ``cfg.runtime.device`` (models load here, once)."""
    if spec.kind == "baseline":
        from fmbseg.models.registry import build_from_config
        from fmbseg.tasks.evaluate.predictors import DenseClipPredictor

        clip = build_from_config(
            cfg.models,
            "clip",
            cfg.runtime.device,
            store_options=store.storage_options,
            mode=spec.mode,
            precision=spec.clip["precision"],
        )
        return DenseClipPredictor(clip)
    from fmbseg.segment import OpenVocabSegmenter
    from fmbseg.tasks.evaluate.predictors import AlignmentPredictor

    assert spec.uri is not None
    segmenter = OpenVocabSegmenter.load(store, spec.uri, device=cfg.runtime.device)
    return AlignmentPredictor.from_segmenter(segmenter)


@dataclass(frozen=True)
class EvalPlan:
    """What the user chose (``StageRun.given``): ``dataset`` already restricted to the
    evaluated samples (``limit`` applied) and the resolved model."""

    dataset: SegDataset
    data_root: str
    limit: int | None
    model: ModelSpec


# ---- core ---------------------------------------------------------------------------------------


def evaluate_shard(
    predictor: Predictor, dataset: SegDataset, cfg: Config, text: torch.Tensor
) -> tuple[ConfusionMatrix, list[dict[str, Any]], float]:
    """The protocol over every sample of ``dataset`` (a shard) -> (counts, error rows, seconds).

    Same arithmetic as :func:`fmbseg.tasks.evaluate.protocol.accumulate`, except that a
    sample that cannot be read becomes an error row instead of failing the shard. ``text``:
    ``predictor.encode_text`` of the prompt plan's names.
    """
    ev = evaluate_config(cfg)
    plan = plan_prompts(dataset.classes, dataset.background, ev)
    cm = ConfusionMatrix(len(dataset.classes), dataset.ignore_index)
    errors: list[dict[str, Any]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for sample in dataset.samples:
            try:
                _sid, image, label = dataset.load(sample)
            except DatasetError as exc:
                uri = dataset.fs.unstrip_protocol(f"{dataset._base}/{sample.image}")
                errors.append(error_row(sample.sample_id, uri, STAGE, "unreadable", str(exc)))
                continue
            cm.update(
                predict_label_map(predictor, image, text, plan, ev, out_size=label.shape), label
            )
    return cm, errors, time.perf_counter() - start


def merge_confusions(
    tables: Any, num_classes: int, ignore_index: int
) -> tuple[ConfusionMatrix, int, float]:
    """Shard tables of :data:`RECORD_SCHEMA` -> (summed matrix, images, seconds)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    images, seconds = 0, 0.0
    for table in tables:
        for row in table.to_pylist():
            cm.merge(ConfusionMatrix.from_dict(json.loads(row["confusion"])))
            images += int(row["images"])
            seconds += float(row["seconds"])
    return cm, images, seconds


# ---- shell --------------------------------------------------------------------------------------


class EvaluateWorker:
    """Shard worker: builds the predictor and the class text embeddings once, then runs
    :func:`evaluate_shard` on each shard. A spec is ``{"start": i, "stop": j}`` into
    ``dataset``'s samples."""

    def __init__(
        self, dataset: SegDataset, spec: ModelSpec, cfg: Config, store: ArtifactStore
    ) -> None:
        self.dataset, self.cfg = dataset, cfg
        self.predictor = build_predictor(spec, cfg, store)
        ev = evaluate_config(cfg)
        plan = plan_prompts(dataset.classes, dataset.background, ev)
        with torch.inference_mode():
            self.text = self.predictor.encode_text(list(plan.names), tuple(ev.templates))

    def process(self, shard: int, spec: dict[str, int]) -> tuple[pa.Table, pa.Table]:
        part = self.dataset.subset(range(spec["start"], spec["stop"]))
        cm, errors, seconds = evaluate_shard(self.predictor, part, self.cfg, self.text)
        row = {
            "shard": shard,
            "images": len(part) - len(errors),
            "seconds": seconds,
            "confusion": json.dumps(cm.to_dict(), separators=(",", ":")),
        }
        return pa.Table.from_pylist([row], schema=RECORD_SCHEMA), errors_table(errors)


def prepare_split(plan: Any, cfg: Config, worker: Callable[[], Any], **meta: Any) -> Prepared:
    """A stage's work over the split ``plan.dataset`` (an :class:`EvalPlan`'s or a label
    plan's): one shard spec ``{"start", "stop"}`` per ``runtime.shard_size`` samples; the
    manifest meta names the split (``dataset``, ``data_root``, ``limit``, ``num_images``)
    and holds ``meta``."""
    ranges = plan_shards(len(plan.dataset), cfg.runtime.shard_size)
    split = {
        "dataset": plan.dataset.name,
        "data_root": plan.data_root,
        "limit": plan.limit,
        "num_images": len(plan.dataset),
    }
    specs = [{"start": r.start, "stop": r.stop} for r in ranges]
    return Prepared(specs, worker, {**split, **meta})


def prepare(job: StageRun) -> Prepared:
    """The evaluation of ``job.given`` (an :class:`EvalPlan`), shard by shard of the split."""
    plan: EvalPlan = job.given
    worker = functools.partial(EvaluateWorker, plan.dataset, plan.model, job.cfg, job.store)
    return prepare_split(plan, job.cfg, worker, model=plan.model.label)


def build_report(job: StageRun) -> dict[str, Any]:
    """The merged metrics of the committed evaluation ``job``, with what was evaluated on what.

    Keys: ``dataset``, ``data_root``, ``limit``, ``model`` (label), ``model_ref`` (identity,
    plus ``uri`` for a registry model), ``fingerprint``, ``num_images`` (evaluated),
    ``images_failed``, ``mIoU``/``mAcc``/``aAcc``/``pixel_accuracy`` (fractions; aAcc is
    pixel accuracy), ``per_class``, ``confusion``, ``pixels``, ``coverage``, the protocol,
    ``seconds`` (summed over shards) and ``images_per_second`` (per worker).
    """
    plan: EvalPlan = job.given
    ds, fp = plan.dataset, job.fp(STAGE)
    cm, images, seconds = merge_confusions(
        job.store.iter_shards(STAGE, fp), len(ds.classes), ds.ignore_index
    )
    metrics = metrics_report(cm, ds.classes)
    ref = {**plan.model.identity(), **({"uri": plan.model.uri} if plan.model.uri else {})}
    return {
        "dataset": ds.name,
        "data_root": plan.data_root,
        "limit": plan.limit,
        "model": plan.model.label,
        "model_ref": ref,
        "fingerprint": fp,
        "num_images": images,
        "images_failed": len(ds) - images,
        **metrics,
        "pixel_accuracy": metrics["aAcc"],
        "dataset_description": dataset_description(ds.name),
        **protocol_report(ds, job.cfg, images, seconds),
    }


def report_key(plan: EvalPlan) -> str:
    """``voc21``, or ``voc21-limit50`` for a partial run (never mistaken for the full split)."""
    return plan.dataset.name if plan.limit is None else f"{plan.dataset.name}-limit{plan.limit}"


def _in_store(registry: ModelRegistry, spec: ModelSpec) -> bool:
    """Whether ``spec`` is a version of this store's registry (not a folder elsewhere)."""
    if spec.kind != "registry" or not (spec.name and spec.version and spec.uri):
        return False
    return spec.uri.rstrip("/") == registry.store.url(registry.rel(spec.name, spec.version))


def write_report(job: StageRun, report: dict[str, Any]) -> list[str]:
    """Write the report JSON of the evaluation ``job``; returns the URIs written, the main
    one first.

    For a registry model of this store ``models/{name}/{version}/eval/{key}.json``
    (:func:`report_key`), and the card's ``metrics`` get ``mIoU/{key}`` and its
    ``evaluations`` the report's place and fingerprint. Always (also for baselines)
    ``evaluations/{fp}/report.json``.
    """
    store, plan, fp = job.store, job.given, job.fp(STAGE)
    spec, key = plan.model, report_key(plan)
    uris = []
    registry = ModelRegistry(store)
    if _in_store(registry, spec):
        assert spec.name is not None and spec.version is not None
        rel = registry.rel(spec.name, spec.version, f"eval/{key}.json")
        store.write_json(rel, report)
        uris.append(store.url(rel))
        card = registry.card(spec.name, spec.version)
        metrics = {**card.get("metrics", {}), f"mIoU/{key}": report["mIoU"]}
        entry = {
            "mIoU": report["mIoU"],
            "report": store.url(rel),
            "fingerprint": fp,
            "images": report["num_images"],
        }
        evals = {**card.get("evaluations", {}), key: entry}
        registry.update_card(spec.name, spec.version, {"metrics": metrics, "evaluations": evals})
    return [*uris, write_evaluation(store, fp, report)]


def write_evaluation(store: ArtifactStore, fp: str, report: dict[str, Any]) -> str:
    """Write ``evaluations/{fp}/report.json`` (``fp``: the report's fingerprint); returns its
    URI."""
    rel = f"evaluations/{fp}/report.json"
    store.write_json(rel, report)
    return store.url(rel)
