"""What a committed stage output is made of: shard receipts and the stage manifest."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardReceipt:
    """Proof that one shard's files are fully written: their names, row counts, checksums."""

    shard: int
    rows: int
    error_rows: int
    sha256: str
    errors_sha256: str | None
    written_at: str
    part: str = ""  # file name of the records, in the stage folder
    errors_part: str | None = None  # file name of the errors table; None when no errors

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardReceipt:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def files(self) -> list[str]:
        return [self.part] + ([self.errors_part] if self.errors_part else [])


@dataclass(frozen=True)
class Manifest:
    """A committed stage output: every shard with its row count and checksum."""

    stage: str
    fingerprint: str
    num_shards: int
    rows: int
    error_rows: int
    shards: list[ShardReceipt]
    committed_at: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["shards"] = [ShardReceipt.from_dict(s) for s in d["shards"]]
        return cls(**d)


def now() -> str:
    """The current UTC time as ISO text (microseconds): manifests' and receipts' timestamps."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")
