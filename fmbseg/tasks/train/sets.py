"""Stage-2 training on several pseudo-label sets, and from an initial model state.

Incremental retraining (:mod:`fmbseg.flows.retrain`) annotates each batch of new images on
its own index, so one training run reads several *label sets*: ``(merge fp, index fp)``
pairs, oldest first. Their labelled images are united (an image whose bytes appear in two
batches trains once, from its first batch); each index has its own DINOv2 feature cache
(:mod:`fmbseg.tasks.train.features`), read together through :class:`FeatureCaches`.

Fine-tuning starts from a registry version's weights (``init_from``); its module must have
the shape this config would build, and its encoder must be the one features come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmbseg.config import Config
from fmbseg.models.align import CARD_KIND, AlignmentConfig, IncompatibleModelError
from fmbseg.models.base import DenseClip, PatchEncoder
from fmbseg.storage.fingerprint import canonical_json, content_hash
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.train.crops import CropBox
from fmbseg.tasks.train.data import LabelledImages, restrict_to
from fmbseg.tasks.train.features import FeatureCache

LabelSet = tuple[str, str]  # (merge fingerprint, index fingerprint)


@dataclass(frozen=True)
class Training:
    """What the user chose for one training run: ``StageRun.given`` of the training stages
    (the class names are ``StageRun.vocabulary``)."""

    sets: tuple[LabelSet, ...]  # oldest first
    init: str | None = None  # the ``name:version`` fine-tuning starts from; None: from scratch
    encoder: PatchEncoder | None = None  # prebuilt models (tests); None: built from cfg.models
    text_model: DenseClip | None = None

    def encoder_name(self, cfg: Config) -> str:
        return self.encoder.name if self.encoder is not None else cfg.models.dino

    def text_name(self, cfg: Config) -> str:
        return getattr(self.text_model, "name", None) or cfg.models.clip

    def inputs(self, vocabulary: Sequence[str]) -> dict[str, str]:
        """The train fingerprint's inputs: one set as ``labels`` and ``index`` (as single-set
        runs always had), several as ``label_sets`` in order; ``init`` when fine-tuning; the
        vocabulary's hash."""
        if len(self.sets) == 1:
            out = {"labels": self.sets[0][0], "index": self.sets[0][1]}
        else:
            out = {"label_sets": canonical_json([list(p) for p in self.sets])}
        if self.init is not None:
            out["init"] = self.init
        return {**out, "vocabulary": content_hash(canonical_json(list(vocabulary)).encode())}


def label_sets(labels: str | Sequence[Sequence[str]], index_fp: str | None) -> list[LabelSet]:
    """``run_train``'s ``(labels_fp, index_fp)`` or ``([(labels_fp, index_fp), ...], None)``
    -> the list of pairs, checked."""
    if isinstance(labels, str):
        if not index_fp:
            raise ValueError(f"labels {labels!r}: give the index fingerprint it covers")
        return [(labels, index_fp)]
    if index_fp is not None:
        raise ValueError("with several (labels_fp, index_fp) pairs, pass index_fp=None")
    pairs = [tuple(p) for p in labels]
    if not pairs or any(len(p) != 2 or not all(isinstance(x, str) and x for x in p) for p in pairs):
        raise ValueError(
            f"label sets must be non-empty (labels_fp, index_fp) pairs, got {labels!r}"
        )
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"label sets repeat a pair: {pairs}")
    return [(str(a), str(b)) for a, b in pairs]


def unite(parts: Sequence[LabelledImages]) -> LabelledImages:
    """The labelled images of every set, in set order; a repeated ``image_id`` (the same
    bytes in a later batch) keeps only its first occurrence."""
    if len(parts) == 1:
        return parts[0]
    whole = LabelledImages(
        image_ids=[i for part in parts for i in part.image_ids],
        uris=[u for part in parts for u in part.uris],
        labels=np.concatenate([part.labels for part in parts]),
        boxes=np.concatenate([part.boxes for part in parts]),
        without_labels=sum(part.without_labels for part in parts),
    )
    first = np.zeros(len(whole.image_ids), dtype=bool)
    first[np.unique(np.asarray(whole.image_ids, dtype=str), return_index=True)[1]] = True
    return dataclasses.replace(restrict_to(whole, first), without_labels=whole.without_labels)


class FeatureCaches:
    """Several committed feature caches read as one (the first that holds an image wins).

    Same reading interface as :class:`FeatureCache` (``in``, ``get``, ``shard_of``, ``len``);
    shard numbers are made distinct across caches so :class:`EpochOrder` groups stay
    per Parquet file. Picklable (each cache is).
    """

    def __init__(self, caches: Sequence[FeatureCache]) -> None:
        self.caches = list(caches)
        self.offsets = np.cumsum([0] + [c.manifest.num_shards for c in self.caches]).tolist()

    def _which(self, image_id: str) -> int:
        for k, cache in enumerate(self.caches):
            if image_id in cache:
                return k
        raise KeyError(f"image {image_id!r} has no cached features in {self.fps}")

    @property
    def fps(self) -> list[str]:
        return [c.fp for c in self.caches]

    def __len__(self) -> int:
        return sum(len(c) for c in self.caches)

    def __contains__(self, image_id: object) -> bool:
        return any(image_id in c for c in self.caches)

    def shard_of(self, image_id: str) -> int:
        k = self._which(image_id)
        return int(self.offsets[k]) + self.caches[k].shard_of(image_id)

    def get(self, image_id: str, crop: int = 0) -> np.ndarray:
        """``(N, C) float16`` patch features of crop ``crop`` of ``image_id``."""
        return self.caches[self._which(image_id)].get(image_id, crop)

    def box(self, image_id: str, crop: int = 0) -> CropBox:
        return self.caches[self._which(image_id)].box(image_id, crop)


def finetune_init(registry: ModelRegistry, name: str, mode: str) -> str | None:
    """The ``name:version`` a retraining in ``mode`` starts from: the champion's when
    fine-tuning (``finetune``) and ``name`` has one; None: from scratch."""
    champion = registry.champion(name) if mode == "finetune" else None
    return f"{name}:{champion}" if champion else None


def init_state(
    registry: ModelRegistry, ref: str, mcfg: AlignmentConfig, encoder_name: str
) -> dict[str, Any]:
    """The weights of ``ref`` (``name:version``) to start from, after checking they fit the
    module to train.

    Raises:
        IncompatibleModelError: another module shape or another encoder; the message says
            which fields differ and that ``mode=scratch`` trains anew.
    """
    tensors, card, _ = registry.load_ref(ref)
    where = f"init_from {ref}"
    if card.get("kind") != CARD_KIND:
        raise IncompatibleModelError(
            f"{where} is not an alignment module (kind {card.get('kind')!r})"
        )
    old = AlignmentConfig.from_dict(card["module"]).to_dict()
    new = mcfg.to_dict()
    diff = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        details = ", ".join(f"{k} {a} (champion) vs {b} (config)" for k, (a, b) in diff.items())
        raise IncompatibleModelError(
            f"{where}: its module differs from the one this config trains ({details}); "
            "fine-tuning needs the same shape: train from scratch (mode=scratch) or match "
            "train.heads / train.mlp_ratio / the encoder and text model"
        )
    if card["encoder"]["name"] != encoder_name:
        raise IncompatibleModelError(
            f"{where} was trained on encoder {card['encoder']['name']!r} features, this config "
            f"uses {encoder_name!r}; train from scratch (mode=scratch)"
        )
    return tensors
