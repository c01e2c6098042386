"""Locate every model's weights before a flow's first stage.

Building a real model downloads its weights; offline that fails only after the stages before
it ran and the hub client retried. :func:`locate_weights` answers "can each checkpoint be
loaded?" in seconds, without loading anything: a local path or ``file://`` URI must exist; a
store URI must be in the download cache or answer an existence check; a pretrained tag
(open_clip's ``openai``, DINOv2's and SAM 3's ``hub``) must be in the Hugging Face cache or answer one
metadata request. Each check has a deadline, so an unreachable host costs seconds, not
minutes. What fails is reported together, each with the key to set.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fmbseg.models.weights import (
    WeightsNotFoundError,
    default_cache_dir,
    download_target,
    is_remote,
    local_candidates,
)

# Seconds one existence check may take (a hub or bucket that answers takes well under one;
# an unreachable one is given up on, not retried).
PROBE_TIMEOUT_S = 8.0


def _with_deadline(check: Callable[[], bool], timeout_s: float) -> bool | str:
    """``check()`` in a daemon thread: its result, or a message when it raised or timed out
    (a thread is used because fsspec/hub clients take no overall deadline of their own)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = check()
        except Exception as exc:  # noqa: BLE001 - any client failure means "not reachable"
            box["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    thread = threading.Thread(target=run, daemon=True, name="fmbseg-locate-weights")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"no answer within {timeout_s:g} s"
    return box.get("error", box.get("ok", False))


def _hf_source(kind: str, name: str, ref: str) -> tuple[str, tuple[str, ...]] | None:
    """(Hugging Face repo, candidate file names) of a pretrained tag, or None (not a tag)."""
    if kind == "clip":
        import open_clip

        from fmbseg.models.clip import CLIP_ARCHS

        arch = CLIP_ARCHS.get(name)
        if arch is None or ref not in open_clip.list_pretrained_tags_by_model(arch):
            return None
        parts = (open_clip.get_pretrained_cfg(arch, ref).get("hf_hub") or "").strip("/")
        repo_id, filename = "/".join(parts.split("/")[:2]), "/".join(parts.split("/")[2:])
        # open_clip prefers the safetensors file and falls back to the .bin
        names = (
            (filename,)
            if filename
            else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        )
        return (repo_id, names) if repo_id else None
    if kind == "dino" and ref == "hub":
        import timm

        from fmbseg.models.dino import DINO_ARCHS

        arch = DINO_ARCHS[name][0]
        hub_id = getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None)
        return (hub_id, ("model.safetensors", "pytorch_model.bin")) if hub_id else None
    if kind == "sam3" and ref == "hub":
        from fmbseg.models.sam3 import HF_FILE, HF_REPO

        return HF_REPO, (HF_FILE,)
    return None


def _locate_hf(repo: str, names: Sequence[str], timeout_s: float) -> str | None:
    """None when one of ``names`` of ``repo`` is cached or the hub has it; else why not."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return None
    looked = f"Hugging Face hub {constants.ENDPOINT}/{repo} (cache {constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return f"{looked}: not cached and HF_HUB_OFFLINE is set"
    answer = _with_deadline(
        lambda: bool(get_hf_file_metadata(hf_hub_url(repo, names[-1]), timeout=timeout_s)),
        timeout_s,
    )
    return None if answer is True else f"{looked}: not cached, and the hub {answer or 'said no'}"


def _locate_file(ref: str, options: Mapping[str, Any], timeout_s: float) -> str | None:
    """None when the path / URI ``ref`` exists (or is in the download cache); else why not."""
    if not is_remote(ref):
        candidates = local_candidates(ref, default_cache_dir())
        if any(p.is_file() for p in candidates):
            return None
        return f"no such file: {', '.join(str(p.absolute()) for p in candidates)}"
    if download_target(ref, default_cache_dir()).is_file():
        return None

    def exists() -> bool:
        import fsspec

        fs, path = fsspec.core.url_to_fs(ref, **dict(options))
        return bool(fs.exists(path))

    answer = _with_deadline(exists, timeout_s)
    if answer is True:
        return None
    return f"{ref}: not in the download cache and {'not found' if answer is False else answer}"


def locate_weights(
    models: Any,
    kinds: Sequence[str] = ("clip", "sam", "dino"),
    store_options: Mapping[str, Any] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """Check that the weights of each ``kinds`` model of ``models`` (a ModelsConfig) can be
    loaded; ``None`` weights (random init) always can. Checks run in parallel.

    Raises:
        WeightsNotFoundError: one line per checkpoint that cannot be found, each naming the
            key to set, then how to run without any (``--config tiny``).
    """
    jobs: dict[str, Callable[[], str | None]] = {}
    for kind in kinds:
        name, ref = getattr(models, kind), getattr(models, f"{kind}_weights")
        if ref is None:
            continue
        hf = _hf_source(kind, name, ref)
        if hf is not None:
            jobs[kind] = functools.partial(_locate_hf, hf[0], hf[1], timeout_s)
        else:
            jobs[kind] = functools.partial(_locate_file, ref, store_options or {}, timeout_s)
    results: dict[str, str | None] = {}
    threads = [
        threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f()), daemon=True)
        for k, f in jobs.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 2)
    problems = []
    for kind in jobs:
        why = results.get(kind, f"no answer within {timeout_s * 2:g} s")
        if why is not None:
            field, name = f"{kind}_weights", getattr(models, kind)
            problems.append(
                f"models.{field}={getattr(models, field)!r} ({name}) cannot be loaded: {why}; "
                f"set models.{field} to a local path or a store URI of the checkpoint"
            )
    if problems:
        raise WeightsNotFoundError(
            "weights not found (offline?), checked before any work started:\n  "
            + "\n  ".join(problems)
            + "\n  or run with tiny random-weight models: --config tiny"
        )
