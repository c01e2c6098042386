"""Artifact store over fsspec: fingerprints, shard commit, manifests, lineage, model registry."""

from fmbseg.storage.fingerprint import content_hash, fingerprint
from fmbseg.storage.models import ModelNotFoundError, ModelRef, ModelRegistry
from fmbseg.storage.store import (
    ArtifactStore,
    Manifest,
    NotCommittedError,
    RetryPolicy,
    ShardReceipt,
    StoreError,
    retry_call,
)

__all__ = [
    "ArtifactStore",
    "Manifest",
    "ModelNotFoundError",
    "ModelRef",
    "ModelRegistry",
    "NotCommittedError",
    "RetryPolicy",
    "ShardReceipt",
    "StoreError",
    "content_hash",
    "fingerprint",
    "retry_call",
]
