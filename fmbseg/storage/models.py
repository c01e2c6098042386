"""The model registry: versioned checkpoints and a champion pointer inside the artifact store.

Layout under the store root::

    models/{name}/{version}/_claim.json          exclusive create: this version number is taken
    models/{name}/{version}/weights.safetensors  the tensors
    models/{name}/{version}/card.json            written last: the version is complete
    models/{name}/champion.json                  pointer moved only by :meth:`ModelRegistry.promote`

Versions are ``v0001``, ``v0002``, ... Concurrent :meth:`ModelRegistry.save` calls never collide:
each claims the next free number with the store's ``create_exclusive`` and moves on to the
following number when another writer got there first. A version counts (for ``versions``,
``latest``, ``load``) only once its card exists, so a save that crashed half way is invisible.

A *reference* names one version: ``"latest"``, ``"champion"``, ``"v0003"`` (with a model name
given separately), ``"name:version"`` (version = ``latest`` | ``champion`` | ``vNNNN``), or a
direct URI / path of a version folder (``s3://bucket/store/models/seg/v0003``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fmbseg.storage.manifest import now
from fmbseg.storage.store import ArtifactStore, StoreError

WEIGHTS = "weights.safetensors"
CARD = "card.json"
CLAIM = "_claim.json"
CHAMPION = "champion.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class ModelNotFoundError(StoreError):
    """A model name, version or reference does not resolve to a complete saved version."""


class CorruptModelError(ModelNotFoundError):
    """A registry file (``champion.json``, ``card.json``, the weights) is missing, truncated
    or names something that is not a valid model name or version; the message names the file."""


def _version_name(number: int) -> str:
    return f"v{number:04d}"


def check_version(version: Any, where: str) -> str:
    """``version`` if it is ``vNNNN``; else :class:`CorruptModelError` naming ``where``."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise CorruptModelError(f"{where}: version {version!r} is not of the form vNNNN")
    return version


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} is not valid: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class ModelRef:
    """One resolved model version: its name, version and the URI of its folder."""

    name: str
    version: str
    uri: str


class ModelRegistry:
    """Save, load, list and promote model versions in an :class:`ArtifactStore`."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    # ---- paths ----------------------------------------------------------------------------

    @staticmethod
    def rel(name: str, version: str | None = None, file: str | None = None) -> str:
        parts = ["models", name] + ([version] if version else []) + ([file] if file else [])
        return "/".join(parts)

    # ---- writing --------------------------------------------------------------------------

    def save(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        card: dict[str, Any],
        files: dict[str, bytes] | None = None,
    ) -> str:
        """Store ``tensors`` and ``card`` as the next version of ``name``; returns ``"vNNNN"``.

        ``card`` must be JSON-able; ``name``, ``version`` and ``created_at`` are added to it.
        Tensors are written contiguous and detached, on CPU (safetensors format). ``files``:
        extra files for the version folder (e.g. ``{"loss_curve.png": ...}``), written before
        the card so a complete version has all of them.
        """
        reserved = {WEIGHTS, CARD, CLAIM} & set(files or {})
        if reserved or any("/" in f for f in files or {}):
            raise ValueError(
                f"model {name!r}: extra file names must be plain and not "
                f"{sorted({WEIGHTS, CARD, CLAIM})}, got {sorted(files or {})}"
            )
        check_name(name)
        if not tensors:
            raise ValueError(f"model {name!r}: refusing to save an empty tensor dict")
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"model {name!r}: values of {bad} are not tensors")
        try:
            json.dumps(card)
        except TypeError as exc:
            raise TypeError(f"model {name!r}: card is not JSON-serialisable: {exc}") from exc
        blob = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})

        number = self._max_number(name) + 1
        while True:
            version = _version_name(number)
            claim = json.dumps({"claimed_at": now()}).encode()
            if self.store.create_exclusive(self.rel(name, version, CLAIM), claim):
                break
            number += 1
        self.store.write_bytes(self.rel(name, version, WEIGHTS), blob)
        for fname, data in (files or {}).items():
            self.store.write_bytes(self.rel(name, version, fname), data)
        full = {**card, "name": name, "version": version, "created_at": now()}
        self.store.write_json(self.rel(name, version, CARD), full)
        return version

    def update_card(self, name: str, version: str, updates: dict[str, Any]) -> dict[str, Any]:
        """Shallow-merge ``updates`` into a version's card (e.g. evaluation metrics); returns it.

        Read-modify-write: two concurrent updates of one card may lose one of them.
        """
        version = self.resolve_version(name, version)
        if {"name", "version"} & set(updates):
            raise ValueError(f"{name}:{version}: a card's name and version cannot be changed")
        card = self.card(name, version)
        card.update(updates)
        self.store.write_json(self.rel(name, version, CARD), card)
        return card

    def promote(
        self, name: str, version: str, reason: str, metrics: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Make ``version`` the champion of ``name``; the decision is appended to the history.

        Returns the new ``champion.json`` content: ``{"version", "promoted_at", "reason",
        "metrics", "history": [every decision, oldest first]}``.
        """
        return self._decide(name, version, reason, metrics, promoted=True)

    def promote_first(
        self, name: str, version: str, reason: str, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Make ``version`` the champion only if ``name`` has none yet; True if it did.

        ``champion.json`` is created exclusively, so of two first models saved at once
        exactly one becomes the champion.
        """
        version = self.resolve_version(name, version)
        record = _decision(None, version, reason, metrics, promoted=True)
        data = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
        return self.store.create_exclusive(self.rel(name, file=CHAMPION), data)

    def reject(
        self, name: str, version: str, reason: str, metrics: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record that ``version`` was considered and not promoted; the champion stays."""
        return self._decide(name, version, reason, metrics, promoted=False)

    def _decide(
        self, name: str, version: str, reason: str, metrics: dict[str, Any] | None, promoted: bool
    ) -> dict[str, Any]:
        version = self.resolve_version(name, version)
        record = _decision(self.champion_record(name), version, reason, metrics, promoted)
        self.store.write_json(self.rel(name, file=CHAMPION), record)
        return record

    # ---- reading --------------------------------------------------------------------------

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name`` (card written), oldest first."""
        check_name(name)
        found = []
        for entry in self.store.ls(self.rel(name)):
            m = _VERSION_RE.match(entry)
            if m and self.store.exists(self.rel(name, entry, CARD)):
                found.append((int(m.group(1)), entry))
        return [v for _, v in sorted(found)]

    def names(self) -> list[str]:
        """Model names that have at least one entry in the store."""
        return [n for n in self.store.ls("models") if _NAME_RE.match(n)]

    def latest(self, name: str) -> str | None:
        vs = self.versions(name)
        return vs[-1] if vs else None

    def champion_record(self, name: str) -> dict[str, Any] | None:
        """``champion.json`` of ``name``, or None when nothing was promoted yet.

        Raises:
            CorruptModelError: the file is truncated, not a JSON object, or names a version
                that is not ``vNNNN``.
        """
        rel = self.rel(name, file=CHAMPION)
        if not self.store.exists(rel):
            return None
        record = self._read_json(rel, "champion pointer")
        if record.get("version") is not None:
            check_version(record["version"], self.store.url(rel))
        return record

    def champion(self, name: str) -> str | None:
        record = self.champion_record(name)
        return None if record is None else record.get("version")

    def resolve_version(self, name: str, version: str = "latest") -> str:
        """``"latest"`` | ``"champion"`` | ``"vNNNN"`` -> a complete version of ``name``."""
        check_name(name)
        if version == "latest":
            found = self.latest(name)
            if found is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no saved versions in {self.store.uri}"
                )
            return found
        if version == "champion":
            found = self.champion(name)
            if found is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no champion in {self.store.uri} (nothing promoted yet; "
                    f"versions: {self.versions(name) or 'none'})"
                )
            return found
        if not _VERSION_RE.match(version):
            raise ValueError(
                f"version {version!r} of model {name!r} must be 'latest', 'champion' or vNNNN"
            )
        if not self.store.exists(self.rel(name, version, CARD)):
            raise ModelNotFoundError(
                f"model {name!r} has no complete version {version!r} in {self.store.uri}; "
                f"versions: {self.versions(name) or 'none'}"
            )
        return version

    def card(self, name: str, version: str = "latest") -> dict[str, Any]:
        """The card of one version (checked: a JSON object naming this version)."""
        version = self.resolve_version(name, version)
        rel = self.rel(name, version, CARD)
        card = self._read_json(rel, "model card")
        if card.get("version", version) != version:
            raise CorruptModelError(
                f"{self.store.url(rel)}: the card names version {card.get('version')!r}, "
                f"but lies in the folder of {version}"
            )
        return card

    def load(
        self, name: str, version: str = "latest"
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors on CPU, card) of one version; ``version`` as in :meth:`resolve_version`."""
        version = self.resolve_version(name, version)
        card = self.card(name, version)
        rel = self.rel(name, version, WEIGHTS)
        return _load_weights(lambda: self.store.read_bytes(rel), self.store.url(rel)), card

    # ---- references -----------------------------------------------------------------------

    def resolve(self, ref: str, name: str | None = None) -> ModelRef:
        """Turn a reference string into a :class:`ModelRef` (see the module docstring).

        ``name`` is the model name for references that do not carry one (``"champion"``,
        ``"latest"``, ``"v0003"``).
        """
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
        if _is_version(ref):
            if name is None:
                raise ValueError(f"model reference {ref!r} needs a model name (or use name:{ref})")
            head, tail = name, ref
        else:
            head, sep, tail = ref.partition(":")
            if not (sep and _NAME_RE.match(head) and _is_version(tail)):
                return self._resolve_uri(ref)
        version = self.resolve_version(head, tail)
        return ModelRef(head, version, self.store.url(self.rel(head, version)))

    def _resolve_uri(self, uri: str) -> ModelRef:
        fs, path = self._fs_for(uri)
        path = path.rstrip("/")
        if not fs.exists(f"{path}/{CARD}"):
            raise ModelNotFoundError(
                f"model reference {uri!r} is neither 'latest', 'champion', 'vNNNN', "
                f"'name:version' nor a model version folder holding {CARD}"
            )
        where = fs.unstrip_protocol(f"{path}/{CARD}")
        card = _parse_json(fs.cat_file(f"{path}/{CARD}"), where, "model card")
        parts = path.split("/")
        name = card.get("name") or (parts[-2] if len(parts) > 1 else "model")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CorruptModelError(f"{where}: model name {name!r} is not valid")
        version = check_version(card.get("version") or parts[-1], where)
        return ModelRef(name, version, fs.unstrip_protocol(path))

    def _fs_for(self, uri: str) -> tuple[Any, str]:
        """The filesystem of ``uri``; the store's storage options apply on its own protocol."""
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        options = self.store.storage_options if protocol in self.store.protocols else {}
        return fsspec.core.url_to_fs(uri, **options)

    def load_ref(
        self, ref: str, name: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], ModelRef]:
        """(tensors, card, resolved ref) of any reference accepted by :meth:`resolve`."""
        resolved = self.resolve(ref, name)
        fs, path = self._fs_for(resolved.uri)
        path = path.rstrip("/")
        card_uri = fs.unstrip_protocol(f"{path}/{CARD}")
        card = _parse_json(fs.cat_file(f"{path}/{CARD}"), card_uri, "model card")
        weights = f"{path}/{WEIGHTS}"
        tensors = _load_weights(lambda: fs.cat_file(weights), fs.unstrip_protocol(weights))
        return tensors, card, resolved

    # ---- helpers --------------------------------------------------------------------------

    def _read_json(self, rel: str, what: str) -> dict[str, Any]:
        try:
            data = self.store.read_bytes(rel)
        except FileNotFoundError:
            raise CorruptModelError(f"{self.store.url(rel)}: {what} missing") from None
        return _parse_json(data, self.store.url(rel), what)

    def _max_number(self, name: str) -> int:
        """Highest version number with any entry (claimed, possibly incomplete)."""
        numbers = [
            int(m.group(1)) for e in self.store.ls(self.rel(name)) if (m := _VERSION_RE.match(e))
        ]
        return max(numbers, default=0)


def _decision(
    current: dict[str, Any] | None,
    version: str,
    reason: str,
    metrics: dict[str, Any] | None,
    promoted: bool,
) -> dict[str, Any]:
    """The champion record ``current`` (None: nothing decided yet) with a decision appended."""
    current = current or {"version": None, "history": []}
    decision = {
        "version": version,
        "promoted": promoted,
        "at": now(),
        "reason": reason,
        "metrics": dict(metrics or {}),
        "previous": current.get("version"),
    }
    record = {**current, "history": [*current.get("history", []), decision]}
    if promoted:
        record.update(
            version=version, promoted_at=decision["at"], reason=reason, metrics=decision["metrics"]
        )
    return record


def _is_version(text: str) -> bool:
    """``latest``, ``champion`` or ``vNNNN``: a version as a reference may name it."""
    return text in ("latest", "champion") or bool(_VERSION_RE.match(text))


def _parse_json(data: bytes, where: str, what: str) -> dict[str, Any]:
    """A registry JSON file's object; :class:`CorruptModelError` naming ``where`` if it is
    truncated or not an object."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptModelError(
            f"{where}: {what} is truncated or not JSON ({len(data)} bytes: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise CorruptModelError(f"{where}: {what} is not a JSON object")
    return obj


def _load_weights(read: Callable[[], bytes], where: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``read`` returns; :class:`CorruptModelError`
    naming ``where`` when it is missing or truncated."""
    try:
        blob = read()
    except FileNotFoundError:
        raise CorruptModelError(f"{where}: weights file missing") from None
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError for torn files
        raise CorruptModelError(
            f"{where}: weights file truncated or not safetensors ({len(blob)} bytes: {exc})"
        ) from None
