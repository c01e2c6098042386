"""Stage `clip_dense` (METHOD 1.1.1-2): sliding-window dense CLIP features and presence.

Core: :func:`run_dense` (crops of several images batched into forward passes, patch
features stitched into one full-image map per image) and :func:`summarise` (presence votes
and the similarity maps of the present classes); geometry in
:mod:`fmbseg.tasks.annotate.windows`.

The stage output has one row per image (``CLIP_DENSE_SCHEMA``) holding the votes, the present
class ids and their similarity maps as float16 bytes, so stages 1.1.3 and 1.2 rerun without
CLIP (METHOD 1.2 note).

With image-level tags (:mod:`fmbseg.data.image_labels`, the paper's semi-supervised variant)
the present classes are an image's tags instead of the crop vote (the votes are still
recorded); everything else is unchanged. An indexed image no tag entry names is an errors
row (``no_image_labels``), not run through CLIP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from fmbseg.config import ClipDenseConfig, Config
from fmbseg.data.image_labels import ImageLabels
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.models.base import DenseClip
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import error_row, errors_table
from fmbseg.tasks.annotate.common import (
    INDEX_STAGE,
    POST_AHEAD,
    VOCABULARY_KEY,
    ImageShardWorker,
    error_from,
    post_pool,
)
from fmbseg.tasks.annotate.windows import Geometry, decode_min_side, geometry, prepare_image

STAGE = "clip_dense"

CLIP_DENSE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("height", pa.int32()),  # original image size
        pa.field("width", pa.int32()),
        pa.field("grid_h", pa.int32()),  # feature grid (cells) of the similarity maps
        pa.field("grid_w", pa.int32()),
        pa.field("num_crops", pa.int32()),
        pa.field("votes", pa.list_(pa.int32())),  # (K,) crops won per vocabulary class
        pa.field("present", pa.list_(pa.int32())),  # (P,) class ids, ascending
        pa.field("sims", pa.binary()),  # (P, grid_h, grid_w) float16, C order, cosine
        pa.field("fingerprint", pa.string()),
    ]
)


# ---- batched inference and stitching -------------------------------------------------------


@dataclass
class DenseImage:
    """Stitched CLIP outputs of one image.

    ``features``: ``(D, grid_h, grid_w) float32`` averaged over overlapping crops, in the
    joint space, not normalised. ``crop_cls``: ``(n_windows, D) float32`` L2-normalised CLS
    embeddings, in ``geometry.windows`` order.
    """

    key: Any  # whatever the caller paired with the image
    geometry: Geometry
    features: torch.Tensor
    crop_cls: torch.Tensor


class _Pending:
    """Accumulators of one image whose crops are in flight."""

    def __init__(self, key: Any, geo: Geometry, dim: int, device: torch.device) -> None:
        self.key, self.geo = key, geo
        gh = max(geo.resized_h, geo.crop) // geo.patch
        gw = max(geo.resized_w, geo.crop) // geo.patch
        self.sum = torch.zeros(dim, gh, gw, device=device)
        self.count = torch.zeros(1, gh, gw, device=device)
        self.cls = torch.zeros(len(geo.windows), dim, device=device)
        self.done = 0

    def add(self, index: int, cls: torch.Tensor, dense: torch.Tensor) -> None:
        y0, x0 = self.geo.windows[index]
        p, g = self.geo.patch, dense.shape[-1]
        self.sum[:, y0 // p : y0 // p + g, x0 // p : x0 // p + g] += dense
        self.count[:, y0 // p : y0 // p + g, x0 // p : x0 // p + g] += 1
        self.cls[index] = cls
        self.done += 1

    def finish(self) -> DenseImage:
        feats = (self.sum / self.count)[:, : self.geo.grid_h, : self.geo.grid_w]
        return DenseImage(self.key, self.geo, feats.float().cpu(), self.cls.float().cpu())


def run_dense(
    model: DenseClip,
    images: Iterable[tuple[Any, np.ndarray]],
    cfg: ClipDenseConfig,
    original_size: Callable[[Any], tuple[int, int]] | None = None,
) -> Iterator[DenseImage]:
    """Stitched dense features and crop CLS embeddings of ``(key, HxWx3 uint8)`` images.

    Crops of consecutive images share forward passes of ``cfg.batch_size`` crops; results
    come out in input order, each as soon as its last crop has been through the model.
    ``original_size(key)``: the ``(height, width)`` of an image given decoded at reduced
    size (:func:`decode_min_side`); the geometry (and so every size recorded) is the
    original's. None = each image is at its original size.
    """
    pre, device = model.preprocess, torch.device(model.device)
    pending: list[_Pending] = []
    batch: list[tuple[_Pending, int, torch.Tensor]] = []

    def flush() -> Iterator[DenseImage]:
        with torch.inference_mode():  # precision is the model's own (cfg.precision at build)
            cls, dense = model.crops_and_dense(torch.stack([c for _, _, c in batch]))
        cls, dense = cls.float(), dense.float()
        for j, (acc, index, _) in enumerate(batch):
            acc.add(index, cls[j], dense[j])
        batch.clear()
        while pending and pending[0].done == len(pending[0].geo.windows):
            yield pending.pop(0).finish()

    for key, image in images:
        height, width = original_size(key) if original_size else image.shape[:2]
        geo = geometry(height, width, cfg, pre)
        canvas = prepare_image(image, geo, pre, device)
        acc = _Pending(key, geo, model.embed_dim, device)
        pending.append(acc)
        for index, (y0, x0) in enumerate(geo.windows):
            batch.append((acc, index, canvas[:, y0 : y0 + geo.crop, x0 : x0 + geo.crop]))
            if len(batch) == cfg.batch_size:
                yield from flush()
    if batch:
        yield from flush()
    assert not pending, "every image's crops went through the model"


# ---- presence and similarity maps ----------------------------------------------------------


@dataclass(frozen=True)
class ClipDenseResult:
    """Per-image output of the stage.

    ``votes``: ``(K,) int32`` crops won per vocabulary class. ``present``: ``(P,) int32``
    class ids with ``votes >= min_crops``, ascending. ``sims``: ``(P, grid_h, grid_w)
    float32`` cosine similarity of each grid cell's feature with the present classes' text
    embeddings. Geometry: :mod:`fmbseg.tasks.annotate.windows` (``cell_h = height / grid_h``).
    """

    image_id: str
    image_uri: str
    height: int
    width: int
    num_crops: int
    votes: np.ndarray
    present: np.ndarray
    sims: np.ndarray

    @property
    def grid_h(self) -> int:
        return int(self.sims.shape[1])

    @property
    def grid_w(self) -> int:
        return int(self.sims.shape[2])

    @property
    def cell_h(self) -> float:
        return self.height / self.grid_h

    @property
    def cell_w(self) -> float:
        return self.width / self.grid_w

    def check_image(self, image: np.ndarray) -> None:
        """Raise ValueError, naming the image, unless ``image`` is the size clip_dense saw."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"image {self.image_id!r} is {image.shape[:2]}, but clip_dense saw "
                f"{(self.height, self.width)}"
            )


def presence_votes(crop_cls: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """``(n, D)`` normalised CLS embeddings, ``(K, D)`` text -> ``(K,) int32`` crops won per class."""
    winners = (crop_cls @ text.T).argmax(dim=1)
    return np.bincount(winners.cpu().numpy(), minlength=text.shape[0]).astype(np.int32)


def similarity_maps(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(D, h, w)`` features, ``(K, D)`` normalised text -> ``(K, h, w)`` cosine similarities."""
    feats = F.normalize(features.float(), dim=0)
    return torch.einsum("dhw,kd->khw", feats, text.float())


def summarise(
    dense: DenseImage,
    text: torch.Tensor,
    min_crops: int,
    image_id: str,
    image_uri: str,
    tags: Sequence[int] | None = None,
) -> ClipDenseResult:
    """Presence (METHOD 1.1.2) and the present classes' similarity maps of one image.

    ``tags``: the image's class ids given by the user; when not None they are the present
    classes, in place of the classes winning at least ``min_crops`` crops.
    """
    text = text.to(dense.features.device)
    votes = presence_votes(dense.crop_cls, text)
    if tags is None:
        present = np.flatnonzero(votes >= min_crops).astype(np.int32)
    else:
        present = np.asarray(sorted(set(tags)), dtype=np.int32)
    sims = similarity_maps(dense.features, text[torch.from_numpy(present).long()])
    return ClipDenseResult(
        image_id,
        image_uri,
        dense.geometry.height,
        dense.geometry.width,
        len(dense.geometry.windows),
        votes,
        present,
        sims.numpy(),
    )


def result_row(result: ClipDenseResult, fingerprint: str) -> dict:
    """A row of ``CLIP_DENSE_SCHEMA`` (similarities stored as float16)."""
    return {
        "image_id": result.image_id,
        "image_uri": result.image_uri,
        "height": result.height,
        "width": result.width,
        "grid_h": result.grid_h,
        "grid_w": result.grid_w,
        "num_crops": result.num_crops,
        "votes": result.votes.tolist(),
        "present": result.present.tolist(),
        "sims": np.ascontiguousarray(result.sims, dtype=np.float16).tobytes(),
        "fingerprint": fingerprint,
    }


def result_from_row(row: dict) -> ClipDenseResult:
    """Inverse of :func:`result_row` (similarities back as float32)."""
    present = np.asarray(row["present"], dtype=np.int32)
    shape = (len(present), row["grid_h"], row["grid_w"])
    sims = np.frombuffer(row["sims"], dtype=np.float16)
    if sims.size != int(np.prod(shape)):
        raise ValueError(
            f"clip_dense row of image {row['image_id']!r}: sims hold {sims.size} "
            f"values, expected {shape}"
        )
    return ClipDenseResult(
        row["image_id"],
        row["image_uri"],
        row["height"],
        row["width"],
        row["num_crops"],
        np.asarray(row["votes"], dtype=np.int32),
        present,
        sims.reshape(shape).astype(np.float32),
    )


def results_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CLIP_DENSE_SCHEMA)


# ---- shell: worker and stage runner --------------------------------------------------------


def _index_size(row: dict) -> tuple[int, int]:
    return int(row["height"]), int(row["width"])


def _size_mismatch(row: dict, image: np.ndarray) -> ValueError | None:
    """An error when a decoded image (maybe reduced) is not the index's image: the file
    changed since the index ran (its records would carry a wrong size)."""
    height, width = _index_size(row)
    h, w = image.shape[:2]
    same = (h, w) == (height, width)
    # reduced: by one factor on both sides, each rounded up (draft and reduce both round up)
    reduced = h < height and w < width and abs(h / height - w / width) <= 2.0 / min(h, w)
    if same or reduced:
        return None
    return ValueError(
        f"{row['uri']}: decoded as {w}x{h}, but the index recorded {width}x{height} "
        "(the file changed since the index ran?)"
    )


class ClipDenseWorker(ImageShardWorker):
    """Shard worker: the CLIP model and the vocabulary's text embeddings are built once.

    A spec is ``{"index": index_fp}``; the output shard has the index shard's number. With
    ``image_labels``, an image's tags are its present classes. Images are decoded at reduced
    size when the stage shrinks them anyway (the records keep the index's original size:
    :func:`run_dense`'s ``original_size``).
    """

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        vocabulary: Sequence[str],
        fp: str,
        storage_options: dict[str, Any] | None = None,
        image_labels: ImageLabels | None = None,
    ) -> None:
        from fmbseg.models.registry import build_from_config

        ImageShardWorker.__init__(self, store, cfg, storage_options)
        self.fp = fp
        self.image_labels = image_labels
        self.model: DenseClip = build_from_config(
            cfg.models,
            "clip",
            cfg.runtime.device,
            store_options=store.storage_options,
            mode=cfg.clip_dense.mode,
            precision=cfg.clip_dense.precision,
        )
        # on the CPU, where the stitched features are: the post thread never waits on the GPU
        self.text = self.model.encode_text(list(vocabulary), cfg.clip_dense.templates).cpu()
        self.post = post_pool()  # presence and similarity maps, beside the model's thread
        self.min_side = decode_min_side(cfg.clip_dense, self.model.preprocess)

    def _images(self, rows: list[dict], errors: list[dict]) -> Iterator[tuple[dict, np.ndarray]]:
        for row, image, exc in self.images.each(rows, lambda r: r["uri"]):
            if exc is None:
                assert image is not None
                exc = _size_mismatch(row, image)
                if exc is None:
                    yield row, image
                    continue
            # an unreadable image is that image's error, not the shard's
            errors.append(error_from(exc, row["image_id"], row["uri"], STAGE))

    def _run(self, rows: list[dict], errors: list[dict]) -> list[dict]:
        out: list[dict] = []
        post: InOrder[None, dict] = InOrder(
            self.post, lambda _, job: out.append(job.result()), POST_AHEAD
        )
        images = self._images(rows, errors)
        for dense in run_dense(self.model, images, self.cfg.clip_dense, _index_size):
            post.submit(None, functools.partial(self._summarise, dense))
        post.drain()
        return out

    def _summarise(self, dense: DenseImage) -> dict:
        """The row of one image (in the post thread, while CLIP runs on the next crops)."""
        row = dense.key
        res = summarise(
            dense,
            self.text,
            self.cfg.clip_dense.min_crops,
            row["image_id"],
            row["uri"],
            row.get("tags"),
        )
        return result_row(res, self.fp)

    def _tagged(self, rows: list[dict], errors: list[dict]) -> list[dict]:
        """With image labels: the rows with their ``tags``; an error row for the others."""
        labels = self.image_labels
        if labels is None:
            return rows
        out = []
        for row in rows:
            tags = labels.for_uri(row["uri"])
            if tags is None:
                message = (
                    f"no entry in image labels {labels.source} (by URI, or by path relative "
                    f"to {labels.root})"
                )
                errors.append(
                    error_row(row["image_id"], row["uri"], STAGE, "no_image_labels", message)
                )
            else:
                out.append({**row, "tags": tags})
        return out

    def prefetch(self, shard: int, spec: dict[str, str]) -> None:
        self.upstream.prefetch(INDEX_STAGE, spec["index"], shard, then=self._start_index)

    def process(self, shard: int, spec: dict[str, str]) -> tuple[pa.Table, pa.Table]:
        rows = self.upstream.read(INDEX_STAGE, spec["index"], shard).to_pylist()
        errors: list[dict] = []
        rows = self._tagged(rows, errors)
        tag_errors = list(errors)
        try:
            out = self._run(rows, errors)
        except Exception:  # noqa: BLE001 - find the image(s) that broke the batch
            out, errors = [], tag_errors
            for row in rows:
                try:
                    out += self._run([row], errors)
                except Exception as exc:
                    errors.append(error_from(exc, row["image_id"], row["uri"], STAGE))
        return results_table(out), errors_table(errors)


def prepare(job: StageRun) -> Prepared:
    """clip_dense over a committed index: one spec per index shard. ``job.vocabulary`` must
    already be validated (``fmbseg.data.vocab.validate_vocabulary``); it goes in the
    manifest meta, where the later stages read it."""
    store, index_fp, vocabulary = job.store, job.fp(INDEX_STAGE), tuple(job.vocabulary)
    factory = functools.partial(
        ClipDenseWorker,
        store,
        job.cfg,
        vocabulary,
        job.fp(STAGE),
        job.storage_options,
        job.image_labels,
    )
    meta: dict[str, Any] = {VOCABULARY_KEY: list(vocabulary), "index": index_fp}
    if job.image_labels is not None:
        labels = job.image_labels
        meta["image_labels"] = {"file": labels.source, **labels.fingerprint_part()}
    specs = [{"index": index_fp}] * store.require_manifest(INDEX_STAGE, index_fp).num_shards
    return Prepared(specs, factory, meta)
