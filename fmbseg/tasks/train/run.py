"""Stage 2 training (METHOD.md stage 2): the alignment module on frozen DINOv2 patch features.

:func:`train` is the body of the declared stage ``train``
(:data:`fmbseg.tasks.train.stages.TRAIN`): pseudo-labels (merge records) + index -> a model
version in the store's :class:`~fmbseg.storage.models.ModelRegistry`, committed as
``stages/train/{fp}``. Every epoch writes a checkpoint (module, optimizer, scheduler, epoch,
losses, RNG states) under ``stages/train/{fp}/checkpoints/``; a restarted run resumes after
the last complete epoch and, because each epoch's batch order depends only on
``(seed, epoch)``, ends with the same weights as an uninterrupted run (exactly, on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.data import DataLoader

from fmbseg.config import RuntimeConfig, replace, to_dict
from fmbseg.engine.ray_cluster import connect
from fmbseg.engine.runner import Progress
from fmbseg.engine.stage import StageRun
from fmbseg.models.align import CARD_KIND, AlignmentConfig, AlignmentModule
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.records import LABEL_COLUMNS
from fmbseg.tasks.annotate.index import read_index
from fmbseg.tasks.annotate.merge import merge_order
from fmbseg.tasks.train.data import (
    EpochOrder,
    PatchDataset,
    labelled_images,
    require_labelled,
    restrict_to,
)
from fmbseg.tasks.train.features import (
    FeatureCache,
    build_encoder,
    check_input_size,
    resolve_device,
)
from fmbseg.tasks.train.loop import load_checkpoint, loss_curve_png, save_checkpoint, train_loop
from fmbseg.tasks.train.sets import FeatureCaches, Training, init_state, unite

log = logging.getLogger(__name__)

STAGE = "train"
LABELS_STAGE = "merge"
# the merge records' columns training reads (bbox and fingerprint are not needed)
RECORD_COLUMNS = (*LABEL_COLUMNS, "image_id", "image_uri", "category")

Features = Callable[[StageRun], list[str]]


def train(job: StageRun, progress: Progress | None, *, features: Features) -> None:
    """Train the alignment module on the label sets of ``job.given`` (:class:`Training`) and
    commit ``stages/train/{fp}``: meta ``{model, version}`` of the registry version saved.

    ``features(job)`` runs (or reuses) the feature cache of each label set and returns their
    fingerprints (with ``train.cache_features``). ``progress(done, total)`` counts epochs:
    once before the first epoch to run, then after each. With GPUs on the Ray cluster the
    whole body runs in a Ray task holding them (:func:`_run_on_ray`).
    """
    cfg, store, given = job.cfg, job.store, job.given
    assert isinstance(given, Training)
    tcfg = cfg.train
    if not tcfg.templates:  # value ranges are checked on the fields (fmbseg.config)
        raise ValueError("train.templates must name at least one text template")
    if given.encoder is None and given.text_model is None and _gpus_on_ray(cfg.runtime):
        return _run_on_ray(job, progress, features)
    fp, names, sets = job.fp(STAGE), list(job.vocabulary), given.sets
    device = resolve_device(cfg.runtime.device)
    registry = ModelRegistry(store)
    # With cached features on Ray actors, this process's encoder only supplies metadata.
    remote = tcfg.cache_features and cfg.runtime.executor == "ray"
    encoder = build_encoder(job, torch.device("cpu") if remote else device)
    text_model = given.text_model
    if text_model is None:
        from fmbseg.models.registry import build_from_config

        log.info("building clip model %s on %s", cfg.models.clip, device)
        text_model = build_from_config(
            cfg.models, "clip", device, store_options=store.storage_options
        )
    grid = check_input_size(encoder, tcfg.input_size)
    what = ", ".join(lfp for lfp, _ in sets)
    parts = []
    for lfp, ifp in sets:
        records = store.read_table(LABELS_STAGE, lfp, columns=RECORD_COLUMNS)
        parts.append(
            labelled_images(
                records,
                names,
                tcfg.input_size,
                encoder.preprocess.patch_size,
                tcfg.min_labelled_fraction,
                tcfg.crops_per_image,
                tcfg.num_loader_workers,
                all_image_ids=read_index(store, ifp).column("image_id").to_pylist(),
                order=merge_order(store, lfp),
            )
        )
    data = unite(parts)
    require_labelled(data, what)
    cache: FeatureCache | FeatureCaches | None = None
    feature_fps: list[str | None] = [None] * len(sets)
    if tcfg.cache_features:
        feature_fps = list(features(job))
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
    if given.init is not None:
        module.load_state_dict(init_state(registry, given.init, mcfg, encoder.name))
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
    if progress is not None:
        progress(start["epoch"] if start else 0, tcfg.epochs)

    def on_epoch(state: dict[str, Any]) -> None:
        save_checkpoint(store, fp, state)
        if progress is not None:
            progress(state["epoch"], tcfg.epochs)

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
            "name": given.text_name(cfg),
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
            "init_from": given.init,
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
    store.commit(STAGE, fp, 0, meta={"model": tcfg.model_name, "version": version})


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


def _train_task(job: StageRun, reports: Any, features: Features) -> None:
    """:func:`train` in a Ray worker, its progress put on the Ray queue ``reports``."""
    train(job, lambda done, total: reports.put((done, total)), features=features)


def _run_on_ray(job: StageRun, progress: Progress | None, features: Features) -> None:
    """:func:`train` as a Ray task holding ``runtime.gpus_per_worker`` GPUs.

    The task reads the mask records and writes the checkpoints, the model version and the
    commit to the store, exactly as a local run does (so resume and promotion are the
    same); this process relays its progress reports. Inside the task every stage runs
    locally (a feature cache the flow has not built yet, on the task's own GPU): a pool of
    GPU actors started from a task that holds a GPU could wait for that GPU forever. Ray retries the task when its
    worker or node dies (``max_retries``), and the retry resumes from the last checkpoint.
    """
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.queue import Queue

    runtime = job.cfg.runtime
    here = dataclasses.replace(job, cfg=replace(job.cfg, runtime={"executor": "local"}))
    reports = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(_train_task).options(
        num_cpus=runtime.cpus_per_worker,
        num_gpus=runtime.gpus_per_worker,
        max_retries=runtime.max_retries,
    )
    log.info("train: on a Ray worker with %g GPU", runtime.gpus_per_worker)
    ref = task.remote(here, reports, features)
    try:
        while True:
            finished, _ = ray.wait([ref], timeout=0.5)
            while not reports.empty():
                done, total = reports.get_nowait()
                if progress is not None:
                    progress(done, total)
            if finished:
                try:
                    ray.get(ref)
                    return
                except RayTaskError as exc:  # the original error, for callers to classify
                    raise (exc.cause if exc.cause is not None else exc) from None
    finally:
        reports.shutdown()
