"""Flow ``annotate-and-train``: index -> annotate -> train -> (optional) evaluate -> promote.

The deployments in ``prefect.yaml`` run this flow. Each part is a subflow (``annotate``,
``train``, ``evaluate``) whose stages are cached by fingerprint, so a rerun with one changed
parameter recomputes only what depends on it. The champion pointer moves by the rule in
:mod:`fmbseg.tasks.train.promotion`: the first model becomes the champion; later ones only when
evaluated at least as good as the champion on the same set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow

from fmbseg.data.image_labels import load_image_labels
from fmbseg.data.samples import SAMPLE_CLASSES, write_sample_photos
from fmbseg.data.vocab import MAX_LABEL_CLASSES, resolve_vocabulary
from fmbseg.flows.annotate import AnnotateResult, annotate_flow
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    configure,
    flow_lineage,
    open_store,
    summary_rows,
    table_artifact,
)
from fmbseg.flows.evaluate import EvaluationReport, evaluate_flow
from fmbseg.flows.train import TrainResult, train_flow
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.annotate.stages import check_teacher
from fmbseg.tasks.train.promotion import decide_and_record


@dataclass(frozen=True)
class Score:
    """A model version's result on the held-out set, as the promotion rule reads it."""

    mIoU: float | None  # mean IoU (fraction; None: no class of the set present)
    dataset: str  # the held-out set's dataset name
    images: int  # images evaluated


@dataclass(frozen=True)
class Promotion:
    """The held-out scores (when evaluated) and the champion decision for a new version."""

    metrics: Score | None  # the new version's (None: not evaluated)
    champion_metrics: Score | None  # the champion's on the same set (None: none to compare)
    promoted: bool  # the new version is now the champion
    reason: str  # why, as recorded in the card and the champion history

    def to_dict(self) -> dict[str, Any]:
        """As lineage records it: plain dicts and None."""
        return asdict(self)


def evaluate_and_promote(
    store: str,
    name: str,
    version: str,
    common: dict[str, Any],
    eval_dataset: str | None = None,
    eval_data_root: str | None = None,
    limit: int | None = None,
    context: dict[str, Any] | None = None,
) -> Promotion:
    """Evaluate ``name:version`` and the current champion on the held-out set (when
    ``eval_dataset`` and ``eval_data_root`` are given), then decide and record promotion.

    ``common``: the config/overrides/ray_address/storage_options parameters of the flows.
    ``context``: recorded with a decision made without evaluation.
    """
    registry = ModelRegistry(open_store(store, common.get("storage_options")))
    if eval_dataset is None or eval_data_root is None:
        verdict = decide_and_record(registry, name, version, None, None, context)
        return Promotion(None, None, verdict.promote, verdict.reason)
    champion = registry.champion(name)

    def score(ref: str) -> Score:
        report = evaluate_flow(
            dataset=eval_dataset,
            data_root=eval_data_root,
            model=ref,
            store=store,
            limit=limit,
            **common,
        )
        assert isinstance(report, EvaluationReport)  # a registry reference, never labels:
        return Score(report.mIoU, eval_dataset, report.num_images)

    candidate = score(f"{name}:{version}")
    baseline = score(f"{name}:{champion}") if champion not in (None, version) else None
    verdict = decide_and_record(
        registry,
        name,
        version,
        asdict(candidate),
        None if baseline is None else asdict(baseline),
        {"evaluated_on": eval_dataset},
    )
    return Promotion(candidate, baseline, verdict.promote, verdict.reason)


@dataclass(frozen=True)
class AnnotateAndTrainResult:
    """What :func:`annotate_and_train_flow` returns."""

    annotation: AnnotateResult  # the pseudo-labels: stage fingerprints and summary
    training: TrainResult  # the model version trained on them
    evaluation: Promotion  # its held-out scores (when evaluated) and the champion decision

    def rows(self) -> list[dict[str, Any]]:
        """The ``annotate-and-train-summary`` table: outputs and the promotion decision."""
        decision = "promoted" if self.evaluation.promoted else "not promoted"
        summary = self.annotation.summary
        return summary_rows(
            {
                "images": summary.images_indexed,
                "labels (COCO)": summary.coco,
                "gallery": summary.gallery,
                "model": self.training.model.ref,
                "champion": f"{decision} ({self.evaluation.reason})",
            }
        )


@flow(name="annotate-and-train", **LINEAGE_HOOKS)
def annotate_and_train_flow(
    images: str | None = None,
    store: str = "./fmbseg-store",
    classes: str | list[str] | None = None,
    vocab: str | None = None,
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    image_labels: str | None = None,
    eval_dataset: str | None = None,
    eval_data_root: str | None = None,
    eval_limit: int | None = None,
) -> AnnotateAndTrainResult:
    """Pseudo-label ``images`` for ``classes``/``vocab`` (:func:`annotate_flow`), train the
    segmenter on them, and (with ``eval_dataset`` + ``eval_data_root``) evaluate it before
    deciding promotion.

    ``images``: an image source; None = the five sample photos bundled with scikit-image,
    written into ``{store}/samples`` (then with no ``classes``/``vocab``, their class list).
    """
    if images is None and classes is None and vocab is None:
        classes = list(SAMPLE_CLASSES)
    # bad names fail before any work, more classes than a label map holds included
    vocabulary = resolve_vocabulary(classes, vocab, max_names=MAX_LABEL_CLASSES)
    if image_labels is not None:  # unknown tag names too
        load_image_labels(image_labels, vocabulary, storage_options)
    if (eval_dataset is None) != (eval_data_root is None):
        raise ValueError("give both eval_dataset and eval_data_root, or neither")
    cfg = configure(config, overrides, ray_address)  # config errors fail before any work
    # and the teacher's package, missing weights
    check_teacher(cfg, image_labels, also=("clip", "dino"), storage_options=storage_options)
    common: dict[str, Any] = dict(
        config=config, overrides=overrides, ray_address=ray_address, storage_options=storage_options
    )
    st = open_store(store, storage_options)
    if images is None:
        images = write_sample_photos(st.url("samples"), storage_options)
    labels = annotate_flow(
        images=images,
        store=store,
        classes=list(vocabulary),
        image_root=image_root,
        image_labels=image_labels,
        **common,
    )
    training = train_flow(
        store=store, labels=labels.fingerprints["merge"], promote_first=False, **common
    )
    model = training.model
    evaluation = evaluate_and_promote(
        store, model.name, model.version, common, eval_dataset, eval_data_root, eval_limit
    )
    out = AnnotateAndTrainResult(labels, training, evaluation)
    table_artifact(
        "annotate-and-train-summary",
        out.rows(),
        description="annotate-and-train: outputs and the promotion decision",
    )
    flow_lineage(
        st,
        "annotate-and-train",
        images=images,
        vocabulary=list(vocabulary),
        config=cfg.to_dict(),
        stages=labels.fingerprints,
        model={"name": model.name, "version": model.version},
        evaluation=evaluation.to_dict(),
    )
    return out
