"""Flow ``annotate-and-train``: index -> annotate -> train -> (optional) evaluate -> promote.

The deployments in ``prefect.yaml`` run this flow. Each part is a subflow (``annotate``,
``train``, ``evaluate``) whose stages are cached by fingerprint, so a rerun with one changed
parameter recomputes only what depends on it. The champion pointer moves by the rule in
:mod:`fmbseg.tasks.train.promotion`: the first model becomes the champion; later ones only when
evaluated at least as good as the champion on the same set.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fmbseg.data.image_labels import load_image_labels
from fmbseg.data.samples import SAMPLE_CLASSES, write_sample_photos
from fmbseg.data.vocab import MAX_LABEL_CLASSES, resolve_vocabulary
from fmbseg.flows.annotate import annotate_flow
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    configure,
    current_flow_run_id,
    open_store,
    record_lineage,
    table_artifact,
)
from fmbseg.flows.evaluate import evaluate_flow
from fmbseg.flows.train import train_flow
from fmbseg.models.locate import locate_weights
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.annotate.stages import check_teacher, teacher_models
from fmbseg.tasks.train.promotion import decide_and_record


def evaluate_and_promote(
    store: str,
    model: dict[str, str],
    dataset: str,
    data_root: str,
    common: dict[str, Any],
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and the current champion, on the same set) and decide promotion.

    ``common``: the config/overrides/ray_address/storage_options parameters of the flows.
    Returns ``{"metrics", "champion_metrics", "promoted", "reason"}``.
    """
    registry = ModelRegistry(open_store(store, common.get("storage_options")))
    name, version = model["model"], model["version"]
    champion = registry.champion(name)

    def mean_iou(ref: str) -> dict[str, Any]:
        report = evaluate_flow(
            dataset=dataset, data_root=data_root, model=ref, store=store, limit=limit, **common
        )
        return {"mIoU": report["mIoU"], "dataset": dataset, "images": report["num_images"]}

    candidate = mean_iou(f"{name}:{version}")
    baseline = mean_iou(f"{name}:{champion}") if champion not in (None, version) else None
    verdict = decide_and_record(
        registry, name, version, candidate, baseline, {"evaluated_on": dataset}
    )
    return {
        "metrics": candidate,
        "champion_metrics": baseline,
        "promoted": verdict.promote,
        "reason": verdict.reason,
    }


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
) -> dict[str, Any]:
    """Pseudo-label ``images`` for ``classes``/``vocab``, train the segmenter on them, and
    (with ``eval_dataset`` + ``eval_data_root``) evaluate it before deciding promotion.
    ``image_labels``: image-level tags replacing CLIP's presence vote (``annotate_flow``).

    ``images``: an image source; None = the five sample photos bundled with scikit-image,
    written into ``{store}/samples`` (then with no ``classes``/``vocab``, their class list).

    Returns ``{"fingerprints", "summary", "model", "evaluation"}``: where the labels, the
    gallery and the model are, and the promotion decision.
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
    check_teacher(cfg)
    locate_weights(
        cfg.models, (*teacher_models(cfg), "clip", "dino"), storage_options
    )  # and missing weights
    common: dict[str, Any] = {
        "config": config,
        "overrides": overrides,
        "ray_address": ray_address,
        "storage_options": storage_options,
    }
    if images is None:
        images = write_sample_photos(
            open_store(store, storage_options).url("samples"), storage_options
        )
    labels = annotate_flow(
        images=images,
        store=store,
        classes=list(vocabulary),
        image_root=image_root,
        image_labels=image_labels,
        **common,
    )
    model = train_flow(
        store=store, labels=labels["fingerprints"]["merge"], promote_first=False, **common
    )
    st = open_store(store, storage_options)
    if eval_dataset is not None and eval_data_root is not None:
        evaluation = evaluate_and_promote(
            store, model, eval_dataset, eval_data_root, common, eval_limit
        )
    else:
        verdict = decide_and_record(ModelRegistry(st), model["model"], model["version"], None, None)
        evaluation = {"metrics": None, "promoted": verdict.promote, "reason": verdict.reason}
    table_artifact(
        "annotate-and-train-summary",
        [
            {"what": "images", "value": labels["summary"]["images_indexed"]},
            {"what": "labels (COCO)", "value": labels["summary"]["coco"]},
            {"what": "gallery", "value": labels["summary"]["gallery"]},
            {"what": "model", "value": f"{model['model']}:{model['version']}"},
            {
                "what": "champion",
                "value": ("promoted" if evaluation["promoted"] else "not promoted")
                + f" ({evaluation['reason']})",
            },
        ],
        description="annotate-and-train: outputs and the promotion decision",
    )
    record_lineage(
        st,
        current_flow_run_id(),
        {
            "flow": "annotate-and-train",
            "images": images,
            "vocabulary": list(vocabulary),
            "config": cfg.to_dict(),
            "stages": labels["fingerprints"],
            "model": {"name": model["model"], "version": model["version"]},
            "evaluation": evaluation,
        },
    )
    return {
        "fingerprints": labels["fingerprints"],
        "summary": labels["summary"],
        "model": model,
        "evaluation": evaluation,
    }
