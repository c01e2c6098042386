"""Checkpoints: resolving a weights reference to a local file, and loading it safely.

A reference (``models.clip_weights`` / ``sam_weights`` / ...) is a local path (a bare file
name is also looked up in the cache directory), a ``file://`` URI (used in place), a remote
fsspec URI (``s3://``, ``gs://``, ``memory://``, ...; downloaded once, see
:func:`resolve_weights`) or a model-specific tag (an open_clip pretrained tag, ``"hub"``),
which the adapter hands to its library before it ever calls :func:`resolve_weights`.

Loading is only ever ``torch.load(..., weights_only=True)`` or safetensors: a checkpoint
cannot run code. Failures raise :class:`WeightsNotFoundError` (nothing to load; the message
says what was asked, where we looked and which config key to set) or
:class:`CheckpointMismatchError` (the file does not fit the architecture; the message names
a few missing / unexpected / mis-shaped keys).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

SHOWN_KEYS = 5  # how many offending keys an error message names
M = TypeVar("M", bound=nn.Module)


class WeightsNotFoundError(FileNotFoundError):
    """A checkpoint could not be found or downloaded; the message says how to fix it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def default_cache_dir() -> Path:
    """``~/.cache/fmbseg/weights``: where downloaded checkpoints are kept."""
    return Path.home() / ".cache" / "fmbseg" / "weights"


def is_remote(ref: str) -> bool:
    """Whether ``ref`` is an fsspec URI to download (a ``file://`` one is a local path)."""
    return "://" in ref and not ref.startswith("file://")


def not_found(
    asked: str,
    *,
    field: str,
    example: str,
    looked: Sequence[str],
    detail: str = "",
    extra_fix: str = "",
) -> WeightsNotFoundError:
    """The one error message for every missing checkpoint.

    Args:
        asked: what was requested, e.g. ``"sam_vit_h weights 'sam_vit_h_4b8939.pth'"``.
        field: the ``models.*`` config key that holds the reference (``"sam_weights"``).
        example: a file name for the example fix (``"sam_vit_h_4b8939.pth"``).
        looked: every path / URI / hub id that was tried.
        detail: the underlying error, if any.
        extra_fix: another way out, e.g. the pretrained tags a library knows.
    """
    where = "; ".join(looked) if looked else "nowhere"
    msg = f"could not find {asked}: looked in {where}."
    if detail:
        msg += f" ({detail})"
    msg += (
        f" Fix: set models.{field} to a local path or a store URI "
        f"(e.g. --set models.{field}=s3://bucket/{example})"
    )
    if extra_fix:
        msg += f", {extra_fix}"
    return WeightsNotFoundError(msg + ".")


def tag_not_found(
    name: str, tag: str, field: str, example: str, looked: str, exc: Exception, extra_fix: str = ""
) -> WeightsNotFoundError:
    """:func:`not_found` for the pretrained ``tag`` of model ``name`` whose download (from
    ``looked``) failed with ``exc``."""
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    return not_found(
        f"{name} weights {tag!r} (models.{field})",
        field=field,
        example=example,
        looked=[looked],
        detail=f"{type(exc).__name__}: {first_line}",
        extra_fix=extra_fix,
    )


def _download(uri: str, target: Path, storage_options: Mapping[str, Any]) -> None:
    """Copy ``uri`` to ``target`` through a temporary name renamed into place."""
    import fsspec

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with fsspec.open(uri, "rb", **storage_options) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        os.replace(tmp, target)  # atomic: readers see no file or the whole file
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def download_target(ref: str, cache: Path) -> Path:
    """Where the remote checkpoint ``ref`` is (or will be) downloaded under ``cache``."""
    key = hashlib.sha256(ref.encode()).hexdigest()[:16]
    return cache / key / (ref.rstrip("/").rsplit("/", 1)[-1] or "weights")


def local_candidates(ref: str, cache: Path) -> list[Path]:
    """The files a local checkpoint ``ref`` may be: the path itself (a ``file://`` URI's
    path), and for a bare file name, that name in ``cache``."""
    if ref.startswith("file://"):
        return [Path(ref[len("file://") :])]
    candidates = [Path(ref).expanduser()]
    if not Path(ref).is_absolute() and len(Path(ref).parts) == 1:
        candidates.append(cache / ref)
    return candidates


def resolve_weights(
    ref: str,
    *,
    field: str,
    example: str,
    cache_dir: str | Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
    extra_fix: str = "",
) -> Path:
    """A local file holding the checkpoint ``ref``: a path, a ``file://`` URI, or a remote
    fsspec URI downloaded once into ``{cache_dir}/{sha256(uri)[:16]}/{file name}`` through
    an atomic rename, so concurrent workers never see a torn file.

    Args:
        field, example, extra_fix: for the error message, see :func:`not_found`.
        cache_dir: where remote checkpoints are downloaded; default :func:`default_cache_dir`.
        storage_options: fsspec options for remote URIs (endpoint, credentials).

    Raises:
        WeightsNotFoundError: the file does not exist or the download failed.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    asked = f"checkpoint {ref!r} (models.{field})"
    if is_remote(ref):
        target = download_target(ref, cache)
        if not target.is_file():
            try:
                _download(ref, target, storage_options or {})
            except Exception as exc:  # noqa: BLE001 - any fsspec/network failure: "not found"
                raise not_found(
                    asked,
                    field=field,
                    example=example,
                    looked=[ref],
                    detail=f"{type(exc).__name__}: {exc}",
                    extra_fix=extra_fix,
                ) from exc
        return target
    candidates = local_candidates(ref, cache)
    for path in candidates:
        if path.is_file():
            return path
    raise not_found(
        asked,
        field=field,
        example=example,
        looked=[str(p.absolute()) for p in candidates],
        extra_fix=extra_fix,
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on CPU: safetensors or ``torch.load(weights_only=True)``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a ``module.`` prefix
    (DDP). Raises :class:`CheckpointMismatchError` for files that are not a plain mapping of
    tensors (pickled modules, TorchScript archives).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise CheckpointMismatchError(
                f"{path} is not a plain state dict that torch.load(weights_only=True) accepts "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); re-save it with "
                "torch.save(model.state_dict(), path) or as .safetensors"
            ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"{path} does not hold a mapping of parameter names to tensors "
            f"(got {type(obj).__name__})"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _shown(keys: Sequence[str]) -> str:
    head = ", ".join(keys[:SHOWN_KEYS])
    return f"{head}, ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else head


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``module`` strictly; a mismatch is an error naming the
    offending keys and ``what`` (the checkpoint: path and model name)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    )
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes}
    parts = [f"{problem}: {_shown(keys)}" for problem, keys in found.items() if keys]
    if parts:
        raise CheckpointMismatchError(
            f"{what} does not fit the model architecture; "
            + "; ".join(parts)
            + ". Check that the weights belong to the registered model name."
        )
    module.load_state_dict(state_dict, strict=True)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init without disturbing the caller's RNG state.

    Random-weight models built in different processes (Ray workers, pipeline stages) must be
    the same model, or text embeddings from one stage would not match images from another.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_seeded(
    make: Callable[[], M],
    weights: str | None,
    label: str,
    name: str,
    *,
    seed: int,
    adapt: Callable[[dict[str, torch.Tensor], M, Path], Mapping[str, torch.Tensor]] | None = None,
    **where: Any,
) -> M:
    """``make()`` under :func:`seeded`, then the checkpoint ``weights`` (``None`` = keep the
    random weights) loaded strictly with :func:`load_into`, after ``adapt(state_dict, model,
    path)`` if given; a mismatch names ``"{label} checkpoint {path} for {name}"``.
    ``weights`` is resolved first (:func:`resolve_weights` with ``where``), so a missing file
    fails before a large init."""
    path = None if weights is None else resolve_weights(weights, **where)
    with seeded(seed):
        model = make()
    if path is not None:
        state = load_state_dict_file(path)
        adapted = state if adapt is None else adapt(state, model, path)
        load_into(model, adapted, f"{label} checkpoint {path} for {name}")
    return model
