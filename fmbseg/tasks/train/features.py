"""Stage `dino_features`: frozen DINOv2 patch features of every indexed image, cached.

Training reads each image's patch features once per epoch; recomputing DINOv2 ViT-L every
epoch (and on every rerun) dominates the cost, so they are a stage of their own
(:data:`fmbseg.tasks.train.stages.DINO_FEATURES`: encoder, weights, input size, crops per
image, index fingerprint):

    records     = one row per training crop (:data:`FEATURE_SCHEMA`)
    manifest    = meta {encoder, weights, input_size, crops_per_image, image_ids: one
                  list per shard (the id -> shard map, so readers need not open every part)}

Each image is resized so its short side is ``input_size`` and its training crops
(:mod:`fmbseg.tasks.train.crops`, a function of the image alone) are cut, normalised with
the encoder's own :class:`~fmbseg.models.base.Preprocess` and encoded: the cache is keyed
per crop, because a crop's features are not a crop of the whole image's features (DINOv2's
tokens attend to the whole input). :mod:`fmbseg.tasks.train.patch_labels` labels the same
crops. Images that fail to load get a row in the stage's errors table and no features.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from fmbseg.engine.runner import errors_table, plan_shards
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.models.base import PatchEncoder
from fmbseg.storage.records import error_row
from fmbseg.storage.store import ArtifactStore, Manifest, NotCommittedError
from fmbseg.tasks.annotate.common import INDEX_STAGE
from fmbseg.tasks.annotate.index import read_index
from fmbseg.tasks.train.crops import CropBox, crop_boxes, crop_inputs

if TYPE_CHECKING:
    from fmbseg.tasks.train.sets import Training

log = logging.getLogger(__name__)
STAGE = "dino_features"
FEATURE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("crop", pa.int32(), nullable=False),  # slot j of the image's crops
        pa.field("resized_h", pa.int32(), nullable=False),  # the crop's box (CropBox)
        pa.field("resized_w", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("num_patches", pa.int32(), nullable=False),  # N
        pa.field("dim", pa.int32(), nullable=False),  # C
        pa.field("features", pa.binary(), nullable=False),  # (N, C) float16, row-major
    ]
)


def check_input_size(encoder: PatchEncoder, input_size: int) -> int:
    """Grid side ``g`` for ``input_size``; an error if it is not a multiple of the patch."""
    p = encoder.preprocess.patch_size
    if input_size % p:
        raise ValueError(
            f"train.input_size={input_size} is not a multiple of encoder "
            f"{encoder.name!r}'s patch size {p}"
        )
    return input_size // p


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context elsewhere (CPU runs stay float32)."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


@torch.no_grad()
def encode_batch(encoder: PatchEncoder, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(B, 3, S, S)`` normalised -> ``(B, N, C) float32`` patch features on ``device``."""
    with autocast_for(device):
        return encoder.patch_features(batch.to(device, non_blocking=True)).float()


def load_image(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Read and decode one image -> ``HxWx3 uint8 RGB`` (the data package's own readers)."""
    from fmbseg.data.images import decode_image
    from fmbseg.data.sources import read_bytes

    return decode_image(read_bytes(uri, storage_options or {}), uri)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_encoder(job: StageRun, device: torch.device) -> PatchEncoder:
    """A training run's encoder on ``device``: its prebuilt one (``given.encoder``, tests) or
    ``cfg.models.dino`` at ``train.input_size``."""
    given: Training = job.given
    if given.encoder is not None:
        return given.encoder
    from fmbseg.models.registry import build_from_config

    cfg = job.cfg
    log.info("building dino model %s on %s", cfg.models.dino, device)
    encoder: PatchEncoder = build_from_config(
        cfg.models,
        "dino",
        device,
        store_options=job.store.storage_options,
        img_size=cfg.train.input_size,
    )
    return encoder


def parts(job: StageRun) -> dict[str, Any]:
    """What the features depend on (the fingerprint's config, also in the manifest meta)."""
    t = job.cfg.train
    return {
        "encoder": job.given.encoder_name(job.cfg),
        "weights": job.cfg.models.dino_weights,
        "input_size": t.input_size,
        "crops_per_image": t.crops_per_image,
    }


def prepare(job: StageRun) -> Prepared:
    """The shards of ``job.fps["index"]``'s images (``runtime.shard_size`` each), encoded by
    :class:`FeatureWorker` (``train.batch_size`` crops per encoder call)."""
    index = read_index(job.store, job.fp(INDEX_STAGE))
    ids, uris = index.column("image_id").to_pylist(), index.column("uri").to_pylist()
    specs = [
        {"image_ids": ids[r.start : r.stop], "uris": uris[r.start : r.stop]}
        for r in plan_shards(len(ids), job.cfg.runtime.shard_size)
    ]
    meta = {**parts(job), "image_ids": [spec["image_ids"] for spec in specs]}
    return Prepared(specs, functools.partial(FeatureWorker, job), meta)


class FeatureWorker:
    """Shard worker of `dino_features`: builds its encoder once, encodes a shard's crops."""

    def __init__(self, job: StageRun) -> None:
        self.train, self.options = job.cfg.train, job.store.storage_options
        self.device = resolve_device(job.cfg.runtime.device)
        self.encoder = build_encoder(job, self.device)
        check_input_size(self.encoder, self.train.input_size)

    def process(self, shard: int, spec: dict[str, list[str]]) -> tuple[pa.Table, pa.Table]:
        """Features of the shard's crops (``FEATURE_SCHEMA``; ``train.batch_size`` crops per
        encoder call) and its errors table."""
        size, encoder = self.train.input_size, self.encoder
        out: dict[str, list[Any]] = {name: [] for name in FEATURE_SCHEMA.names}
        errors = []
        pending: list[tuple[str, int, CropBox, torch.Tensor]] = []

        def flush() -> None:
            feats = encode_batch(encoder, torch.stack([p[3] for p in pending]), self.device)
            for (image_id, j, box, _), f in zip(
                pending, feats.to(torch.float16).cpu().numpy(), strict=True
            ):
                out["image_id"].append(image_id)
                out["crop"].append(j)
                for key, value in zip(
                    ("resized_h", "resized_w", "y0", "x0"), box.as_tuple(), strict=True
                ):
                    out[key].append(value)
                out["num_patches"].append(f.shape[0])
                out["dim"].append(f.shape[1])
                out["features"].append(np.ascontiguousarray(f).tobytes())
            pending.clear()

        for image_id, uri in zip(spec["image_ids"], spec["uris"], strict=True):
            try:
                image = load_image(uri, self.options)
            except Exception as exc:  # noqa: BLE001 - recorded, the image is skipped
                errors.append(error_row(image_id, uri, STAGE, type(exc).__name__, str(exc)))
                continue
            h, w = image.shape[:2]
            boxes = crop_boxes(image_id, h, w, size, self.train.crops_per_image)
            for j, (box, x) in enumerate(
                zip(boxes, crop_inputs(image, boxes, encoder.preprocess, size), strict=True)
            ):
                pending.append((image_id, j, box, x))
                if len(pending) == self.train.batch_size:
                    flush()
        if pending:
            flush()
        return pa.table(out, schema=FEATURE_SCHEMA), errors_table(errors)


class FeatureCache:
    """Read access to a committed `dino_features` output: ``get(image_id, crop) -> (N, C)
    float16``, the features of crop slot ``crop`` of the image, and ``box(image_id, crop)``.

    Keeps the ``max_shards`` most recently used shards in memory (a shard is one Parquet
    file); read images in shard order (:meth:`shard_of`) to read each shard once per pass.
    Picklable: DataLoader workers each hold their own shard buffer.
    """

    def __init__(self, store: ArtifactStore, fp: str, max_shards: int = 2) -> None:
        self.store = store
        self.fp = fp
        self.max_shards = max_shards
        manifest = store.manifest(STAGE, fp)
        if manifest is None:
            raise NotCommittedError(f"no committed {STAGE} output {fp!r} in {store.uri}")
        self.manifest: Manifest = manifest
        self.encoder: str = manifest.meta["encoder"]
        failed = set()
        if manifest.error_rows:
            failed = set(store.read_table(STAGE, fp, kind="errors").column("image_id").to_pylist())
        self._shard_of = {
            image_id: shard
            for shard, ids in enumerate(manifest.meta["image_ids"])
            for image_id in ids
            if image_id not in failed
        }
        self._shards: OrderedDict[int, tuple[pa.Table, dict[tuple[str, int], int]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "fp": self.fp, "max_shards": self.max_shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["fp"], state["max_shards"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._shard_of

    def shard_of(self, image_id: str) -> int:
        return self._shard_of[image_id]

    def get(self, image_id: str, crop: int = 0) -> np.ndarray:
        """``(N, C) float16`` patch features of crop slot ``crop``, row-major patches (as the
        encoder returns them)."""
        table, row = self._row(image_id, crop)
        n, c = table.column("num_patches")[row].as_py(), table.column("dim")[row].as_py()
        blob = table.column("features")[row].as_py()
        return np.frombuffer(blob, dtype=np.float16).reshape(n, c)

    def box(self, image_id: str, crop: int = 0) -> CropBox:
        """Where crop slot ``crop`` of the image was cut (to check labels were cut alike)."""
        table, row = self._row(image_id, crop)
        return CropBox(
            *(table.column(k)[row].as_py() for k in ("resized_h", "resized_w", "y0", "x0"))
        )

    def _row(self, image_id: str, crop: int) -> tuple[pa.Table, int]:
        if image_id not in self._shard_of:
            raise KeyError(
                f"image {image_id!r} has no cached features in {STAGE}/{self.fp} "
                "(it failed to load when the cache was built, or is not indexed)"
            )
        shard = self._shard_of[image_id]
        entry = self._shards.get(shard)
        if entry is None:
            table = self.store.read_shard(STAGE, self.fp, shard, manifest=self.manifest)
            ids, crops = table.column("image_id").to_pylist(), table.column("crop").to_pylist()
            keys = zip(ids, crops, strict=True)
            rows = {key: i for i, key in enumerate(keys)}
            entry = self._shards[shard] = (table, rows)
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(shard)
        table, rows = entry
        if (image_id, crop) not in rows:
            raise KeyError(f"image {image_id!r} has no crop {crop} in {STAGE}/{self.fp}")
        return table, rows[image_id, crop]
