"""Stage 2 training (METHOD.md stage 2): the alignment module on frozen DINOv2 patch features.

:func:`run_train` is the stage: pseudo-labels (merge records) + index -> a model version in
the store's :class:`~fmbseg.storage.models.ModelRegistry`. The stage is fingerprinted like
any other (train config, encoder, text model, vocabulary, label and index fingerprints); a
committed fingerprint returns its model at once. While it runs, every epoch writes a
checkpoint (module, optimizer, scheduler, epoch, losses, RNG states) under
``stages/train/{fp}/checkpoints/``; a restarted run resumes after the last complete epoch and,
because each epoch's batch order depends only on ``(seed, epoch)``, ends with the same
weights as an uninterrupted run (exactly, on CPU).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from fmbseg.config import Config, RuntimeConfig, TrainConfig, replace, to_dict
from fmbseg.engine.ray_cluster import connect
from fmbseg.models.align import CARD_KIND, AlignmentConfig, AlignmentModule
from fmbseg.models.base import DenseClip, PatchEncoder
from fmbseg.storage.fingerprint import canonical_json, content_hash, fingerprint
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.merge import merge_order
from fmbseg.tasks.train.data import (
    EpochOrder,
    PatchDataset,
    labelled_images,
    require_labelled,
    restrict_to,
    vocabulary_names,
)
from fmbseg.tasks.train.features import (
    FeatureCache,
    build_feature_cache,
    check_input_size,
)
from fmbseg.tasks.train.loop import load_checkpoint, loss_curve_png, save_checkpoint, train_loop
from fmbseg.tasks.train.sets import (
    FeatureCaches,
    init_state,
    label_sets,
    resolve_init,
    sets_inputs,
    unite,
)

log = logging.getLogger(__name__)

STAGE = "train"
CODE_VERSION = "2"  # 2: short-side resize + crops (train_crops); 1: whole image squashed
LABELS_STAGE = "merge"
# What label maps are composed from (bbox and fingerprint are not needed).
LABEL_COLUMNS = (
    "image_id",
    "image_uri",
    "height",
    "width",
    "category_id",
    "category",
    "source",
    "score",
    "rle_counts",
    "area",
)

Progress = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_train_config(cfg: TrainConfig) -> None:
    # value ranges are checked where the fields are defined (fmbseg.config)
    if not cfg.templates:
        raise ValueError("train.templates must name at least one text template")


def train_fingerprint(
    cfg: Config,
    encoder_name: str,
    text_name: str,
    labels_fp: str | Sequence[tuple[str, str]],
    index_fp: str | None,
    names: list[str],
    init: str | None = None,
) -> str:
    """``labels_fp``/``index_fp`` as :func:`run_train` takes them; every pair counts, in
    order; ``init``: the ``name:version`` fine-tuning starts from (None: from scratch)."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k != "num_loader_workers"}
    return fingerprint(
        STAGE,
        CODE_VERSION,
        {
            "train": train,
            "encoder": encoder_name,
            "encoder_weights": cfg.models.dino_weights,
            "text": text_name,
            "text_weights": cfg.models.clip_weights,
        },
        {
            **sets_inputs(label_sets(labels_fp, index_fp), init),
            "vocabulary": content_hash(canonical_json(names).encode()),
        },
    )


# ---- the stage -------------------------------------------------------------------------------


def _build(
    cfg: Config, kind: Literal["clip", "dino"], options: dict[str, Any], device: torch.device
) -> Any:
    """The ``kind`` model ``cfg.models`` names (DINOv2 at ``train.input_size``)."""
    from fmbseg.models.registry import build_from_config

    extra: dict[str, Any] = {"img_size": cfg.train.input_size} if kind == "dino" else {}
    log.info("building %s model %s on %s", kind, getattr(cfg.models, kind), device)
    return build_from_config(cfg.models, kind, device, store_options=options, **extra)


def _given(encoder: PatchEncoder, device: torch.device) -> PatchEncoder:
    return encoder


def run_train(
    store: ArtifactStore,
    cfg: Config,
    labels_fp: str | Sequence[tuple[str, str]],
    index_fp: str | None,
    vocab: Any,
    *,
    progress: Progress | None = None,
    encoder: PatchEncoder | None = None,
    text_model: DenseClip | None = None,
    init_from: str | None = None,
) -> tuple[str, str]:
    """Train the alignment module on merge-stage pseudo-labels; returns (model name, version).

    Args:
        store: artifact store holding the merge output ``labels_fp`` and index ``index_fp``.
        cfg: the whole config (``train``, ``models``, ``runtime`` sections are read).
        labels_fp, index_fp: one label set, or ``labels_fp`` = several ``(labels_fp,
            index_fp)`` pairs (oldest first) and ``index_fp=None``: trained on their union
            (:mod:`fmbseg.tasks.train.sets`).
        vocab: the class names the pseudo-labels were made with (``category_id`` = position),
            a list of strings or an object with ``.names``.
        progress: called with a dict per finished epoch (``stage``, ``epoch``, ``epochs``,
            ``loss``) and per feature-cache shard.
        encoder, text_model: prebuilt models (tests); default: built from ``cfg.models``.
        init_from: a registry reference (``champion``, ``name:vNNNN``) whose weights training
            starts from (fine-tuning); its module must fit this config's.
    """
    from fmbseg.tasks.annotate.index import read_index

    tcfg = cfg.train
    check_train_config(tcfg)
    names = vocabulary_names(vocab)
    device = resolve_device(cfg.runtime.device)
    registry = ModelRegistry(store)
    options = store.storage_options
    encoder_name = encoder.name if encoder is not None else cfg.models.dino
    text_name = getattr(text_model, "name", None) or cfg.models.clip
    sets = label_sets(labels_fp, index_fp)
    init_ref = resolve_init(registry, init_from, tcfg.model_name) if init_from else None
    init = f"{init_ref.name}:{init_ref.version}" if init_ref else None
    fp = train_fingerprint(cfg, encoder_name, text_name, sets, None, names, init)
    done = store.manifest(STAGE, fp)
    if done is not None:  # before building any model: a committed run costs nothing
        log.info("train %s already committed: %s:%s", fp, done.meta["model"], done.meta["version"])
        return done.meta["model"], done.meta["version"]
    if encoder is None and text_model is None and _gpus_on_ray(cfg.runtime):
        return _run_on_ray(store, cfg, labels_fp, index_fp, names, progress, init_from)

    if encoder is None:
        factory = functools.partial(_build, cfg, "dino", options)
        # With cached features on Ray actors, this process's encoder only supplies metadata.
        remote = tcfg.cache_features and cfg.runtime.executor == "ray"
        encoder = factory(torch.device("cpu") if remote else device)
    else:
        factory = functools.partial(_given, encoder)
    text_model = text_model or _build(cfg, "clip", options, device)
    grid = check_input_size(encoder, tcfg.input_size)
    what = ", ".join(lfp for lfp, _ in sets)
    indexes, parts = [], []
    for lfp, ifp in sets:
        records = store.read_table(LABELS_STAGE, lfp, columns=LABEL_COLUMNS)
        indexes.append(read_index(store, ifp))
        parts.append(
            labelled_images(
                records,
                names,
                tcfg.input_size,
                encoder.preprocess.patch_size,
                tcfg.min_labelled_fraction,
                tcfg.crops_per_image,
                tcfg.num_loader_workers,
                all_image_ids=indexes[-1].column("image_id").to_pylist(),
                order=merge_order(store, lfp),
            )
        )
    data = unite(parts)
    require_labelled(data, what)
    cache: FeatureCache | FeatureCaches | None = None
    feature_fps: list[str | None] = [None] * len(sets)
    if tcfg.cache_features:
        for k, ((_, ifp), index) in enumerate(zip(sets, indexes, strict=True)):
            feature_fps[k] = build_feature_cache(
                store,
                encoder.name,
                cfg.models.dino_weights,
                tcfg.input_size,
                ifp,
                index.select(["image_id", "uri"]),
                crops_per_image=tcfg.crops_per_image,
                encoder_factory=factory,
                runtime=cfg.runtime,
                batch_size=tcfg.batch_size,
                storage_options=options,
                progress=progress,
            )
        caches = [FeatureCache(store, str(ffp)) for ffp in feature_fps]
        cache = caches[0] if len(caches) == 1 else FeatureCaches(caches)
        data = restrict_to(data, [image_id in cache for image_id in data.image_ids])
        require_labelled(data, what)
    dataset = PatchDataset(
        data,
        cache=cache,  # type: ignore[arg-type]  # FeatureCaches reads like a FeatureCache
        preprocess=encoder.preprocess,
        input_size=tcfg.input_size,
        storage_options=store.storage_options,
    )

    with torch.no_grad():
        text = text_model.encode_text(names, tuple(tcfg.templates)).float().to(device)
    out_dim = tcfg.out_dim or text.shape[1]
    if out_dim != text.shape[1]:
        raise ValueError(
            f"train.out_dim={out_dim} differs from the text model's embedding "
            f"width {text.shape[1]}: the module must map into the text space"
        )
    mcfg = AlignmentConfig(
        in_dim=encoder.embed_dim, out_dim=out_dim, heads=tcfg.heads, mlp_ratio=tcfg.mlp_ratio
    )
    torch.manual_seed(tcfg.seed)
    module = AlignmentModule(mcfg)
    if init_ref is not None:
        module.load_state_dict(init_state(registry, init_ref, mcfg, encoder.name))
    module = module.to(device)
    sampler = EpochOrder(dataset.groups(), tcfg.seed, dataset.slots())
    loader = DataLoader(
        dataset,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        num_workers=tcfg.num_loader_workers,
        pin_memory=device.type == "cuda",
    )
    start = load_checkpoint(store, fp)
    if start is not None:
        log.info("train %s: resuming after epoch %d", fp, start["epoch"])

    def on_epoch(state: dict[str, Any]) -> None:
        save_checkpoint(store, fp, state)
        if progress is not None:
            progress(
                {
                    "stage": STAGE,
                    "epoch": state["epoch"],
                    "epochs": tcfg.epochs,
                    "loss": state["epoch_losses"][-1],
                }
            )

    epoch_losses, step_losses = train_loop(
        module,
        loader,
        sampler,
        text,
        tcfg,
        device,
        encoder=None if cache is not None else encoder,
        start=start,
        on_epoch=on_epoch,
    )

    card = {
        "kind": CARD_KIND,
        "module": mcfg.to_dict(),
        "temperature": tcfg.temperature,
        "encoder": {
            "name": encoder.name,
            "weights": cfg.models.dino_weights,
            "input_size": tcfg.input_size,
            "grid": grid,
            "embed_dim": encoder.embed_dim,
            "preprocess": asdict(encoder.preprocess),
        },
        "text": {
            "name": text_name,
            "weights": cfg.models.clip_weights,
            "quick_gelu": getattr(cfg.models, "clip_quick_gelu", None),
            "templates": list(tcfg.templates),
            "embed_dim": out_dim,
        },
        "vocabulary": names,
        "data": {
            "labels_fp": sets[0][0],
            "index_fp": sets[0][1],
            "features_fp": feature_fps[0],
            "label_sets": [
                {"labels_fp": lfp, "index_fp": ifp, "features_fp": ffp}
                for (lfp, ifp), ffp in zip(sets, feature_fps, strict=True)
            ],
            "init_from": init,
            "train_fp": fp,
            "images": len(data.image_ids),
            "images_without_labels": data.without_labels,
            "labelled_patches": int((data.labels >= 0).sum()),
        },
        "train": to_dict(tcfg),
        "trained_in": _this_process(device),
        "epoch_losses": epoch_losses,
        "metrics": {"final_loss": epoch_losses[-1]},
        "loss_curve": "loss_curve.png",
    }
    tensors = {k: v.detach().float() for k, v in module.state_dict().items()}
    version = registry.save(
        tcfg.model_name,
        tensors,
        card,
        files={"loss_curve.png": loss_curve_png(epoch_losses, step_losses)},
    )
    manifest, _ = store.commit(STAGE, fp, 0, meta={"model": tcfg.model_name, "version": version})
    return manifest.meta["model"], manifest.meta["version"]


# ---- where the loop runs ---------------------------------------------------------------------


def _gpus_on_ray(runtime: RuntimeConfig) -> bool:
    """Whether training goes to a Ray worker: the Ray executor, a Ray cluster this process
    is asked to use (``ray_address``) or already uses, and GPUs on it. Otherwise the loop
    runs here, as a local Ray would only run it on this machine's GPUs anyway."""
    if runtime.executor != "ray":
        return False
    loaded = sys.modules.get("ray")
    if runtime.ray_address is None and not (loaded is not None and loaded.is_initialized()):
        return False
    import ray

    connect(runtime.ray_address)
    return float(ray.cluster_resources().get("GPU", 0.0)) > 0


def _this_process(device: torch.device) -> dict[str, Any]:
    """Where the epochs ran: host, pid, Ray node (None outside Ray), device."""
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ray_node": node,
        "device": str(device),
    }


def _train_task(
    store: ArtifactStore,
    cfg: Config,
    labels_fp: Any,
    index_fp: str | None,
    names: list[str],
    init_from: str | None,
    reports: Any,
) -> tuple[str, str]:
    """The body of the Ray task: :func:`run_train` in a GPU worker; progress reports go to
    the driver through the Ray queue ``reports``."""
    return run_train(
        store, cfg, labels_fp, index_fp, names, progress=reports.put, init_from=init_from
    )


def _run_on_ray(
    store: ArtifactStore,
    cfg: Config,
    labels_fp: Any,
    index_fp: str | None,
    names: list[str],
    progress: Progress | None,
    init_from: str | None,
) -> tuple[str, str]:
    """:func:`run_train` as a Ray task holding ``runtime.gpus_per_worker`` GPUs.

    The task reads the mask records and writes the checkpoints, the model version and the
    commit to the store, exactly as a local run does (so resume and promotion are the
    same); this process relays its progress reports. Inside the task every stage runs
    locally (the feature cache on the task's own GPU): a pool of GPU actors started from a
    task that holds a GPU could wait for that GPU forever. Ray retries the task when its
    worker or node dies (``max_retries``), and the retry resumes from the last checkpoint.
    """
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.queue import Queue

    runtime = cfg.runtime
    here = replace(cfg, runtime={"executor": "local"})
    reports = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(_train_task).options(
        num_cpus=runtime.cpus_per_worker,
        num_gpus=runtime.gpus_per_worker,
        max_retries=runtime.max_retries,
    )
    log.info("train: on a Ray worker with %g GPU", runtime.gpus_per_worker)
    ref = task.remote(store, here, labels_fp, index_fp, names, init_from, reports)
    try:
        while True:
            finished, _ = ray.wait([ref], timeout=0.5)
            while not reports.empty():
                report = reports.get_nowait()
                if progress is not None:
                    progress(report)
            if finished:
                try:
                    name, version = ray.get(ref)
                    return name, version
                except RayTaskError as exc:  # the original error, for callers to classify
                    raise (exc.cause if exc.cause is not None else exc) from None
    finally:
        reports.shutdown()
