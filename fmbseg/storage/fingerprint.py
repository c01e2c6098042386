"""Stage fingerprints: what a stage's output is a function of.

``fingerprint = sha256(stage name, stage code version, the stage's config, input fingerprints)``,
truncated to 16 hex characters. A stage whose fingerprint is committed in the store is
skipped; a changed config value or an upstream change produces a new fingerprint and
reruns the stage and whatever consumes it, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from fmbseg.config import to_dict
from fmbseg.storage.retry import NotCommittedError

FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace; dataclasses and tuples flattened)."""
    return json.dumps(to_dict(value), sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(
    stage: str, code_version: str, config: Any, inputs: Mapping[str, str] | None = None
) -> str:
    """The fingerprint of one stage run.

    Args:
        stage: stage name, e.g. ``"clip_dense"``.
        code_version: bumped by hand when the stage's output format or semantics change.
        config: anything JSON-able (typically the stage's frozen config dataclass, or a dict
            of the sections it reads).
        inputs: name -> fingerprint (or content hash) of every input the stage reads.
    """
    payload = {
        "stage": stage,
        "code_version": code_version,
        "config": to_dict(config),
        "inputs": dict(sorted((inputs or {}).items())),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def content_hash(data: bytes) -> str:
    """Identity of a blob (images are identified by this): sha256, first 16 hex chars."""
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_LENGTH]


_TOKEN_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def check_fingerprint(text: str, what: str) -> str:
    """``text`` if it can be a fingerprint (letters, digits, ``_``, ``-``); a user's or a
    store's string becomes part of a store path, so ``../index/x`` must not reach one.

    Raises:
        NotCommittedError: naming ``what`` (e.g. ``"labels"``) and the string.
    """
    if not isinstance(text, str) or not _TOKEN_RE.match(text):
        raise NotCommittedError(
            f"{what} {text!r} is not a fingerprint (letters and digits, as `fmbseg status` "
            "lists them) or 'latest'"
        )
    return text
