"""What every flow shares: config/store setup, the stage-task pattern, artifacts, lineage.

The stage-task pattern: each pipeline stage is one Prefect task made with
:func:`stage_task`. Its first two parameters are ``store`` (an ArtifactStore) and ``fp``
(the stage fingerprint, computed by the flow before the call); its body runs the stage
through :func:`fmbseg.tasks.runner.run_stage` and returns ``fp``. The cache key is the
fingerprint, but only while the store really holds a committed output for it, so a
deleted or different store never yields a stale cache hit (the store, not Prefect's
result cache, is the source of truth; Prefect's cache just makes the skip visible in the
UI). Failed stage tasks are retried (the retry resumes from the committed shards), except
for input errors that a retry cannot fix.

Progress: :class:`StageProgress` is the runner's ``progress(done, total)`` callback. Inside
a Prefect run it keeps a progress artifact up to date; in every case it forwards to the
listeners registered with :func:`observe_progress` (the CLI's progress bars).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context

from fmbseg.config import Config, ConfigError, load_config, replace
from fmbseg.data.datasets import DatasetError
from fmbseg.data.sources import SourceError
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError
from fmbseg.storage.models import ModelNotFoundError
from fmbseg.storage.store import ArtifactStore, NotCommittedError
from fmbseg.tasks.ray_cluster import RayAddressError
from fmbseg.tasks.segment import IncompatibleModelError
from fmbseg.tasks.train_data import NoLabelledPatchesError

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# Errors in the user's input: retrying the task cannot help, and the CLI reports them
# as "fmbseg: error: ..." without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, SourceError, NotCommittedError, DatasetError, ModelNotFoundError,
    WeightsNotFoundError, CheckpointMismatchError, NoLabelledPatchesError, IncompatibleModelError,
    RayAddressError,
)  # fmt: skip

Listener = Callable[[str, int, int], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


# ---- setup ------------------------------------------------------------------------------------


def configure(
    config: str | Config = "default",
    overrides: Sequence[str] | None = None,
    ray_address: str | None = None,
) -> Config:
    """A flow's Config: a built-in name or YAML path plus ``section.key=value`` overrides.

    ``ray_address`` (when given) replaces ``runtime.ray_address``.
    """
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("pass overrides with a config name or file, not with a Config")
        cfg = config
    else:
        cfg = load_config(config, list(overrides or ()))
    if ray_address:
        cfg = replace(cfg, runtime={"ray_address": ray_address})
    return cfg


def open_store(uri: str, storage_options: Mapping[str, Any] | None = None) -> ArtifactStore:
    return ArtifactStore(uri, dict(storage_options or {}))


def _in_prefect_run() -> bool:
    try:
        get_run_context()
    except RuntimeError:  # MissingContextError: called outside a flow/task run (.fn() tests)
        return False
    return True


def current_flow_run_id() -> str | None:
    """The running flow's id, or None outside a flow run."""
    if not _in_prefect_run():
        return None
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


# ---- stage tasks ------------------------------------------------------------------------------


def _store_tag(store: ArtifactStore) -> str:
    return hashlib.sha256(store.uri.encode()).hexdigest()[:12]


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str | None]:
    """A Prefect ``cache_key_fn``: ``fmbseg-{stage}-{store}-{fp}`` once ``fp`` is committed.

    A task of several stages in one pass (``"a+b"``) takes ``fp`` as ``{stage: fp}``; its
    key needs every one committed.
    """

    def key(context: Any, parameters: dict[str, Any]) -> str | None:
        store, fp = parameters["store"], parameters["fp"]
        fps = dict(fp) if isinstance(fp, Mapping) else {stage: fp}
        if not all(store.is_committed(s, f) for s, f in fps.items()):
            return None
        return f"fmbseg-{stage}-{_store_tag(store)}-{'-'.join(fps.values())}"

    return key


def retry_unless_user_error(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is an input error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself could not be loaded: retry
        return True
    return not is_user_error(exc)


def is_user_error(exc: BaseException) -> bool:
    """An input error, also when a stage's worker raised it (``StageError.cause``)."""
    return isinstance(exc, USER_ERRORS) or isinstance(getattr(exc, "cause", None), USER_ERRORS)


def stage_task(
    stage: str, *, retries: int = 1, retry_delay_seconds: float = 5.0
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Decorator: a Prefect task for ``stage``, cached by fingerprint, retried on failure.

    The decorated function must take ``store`` and ``fp`` parameters and return ``fp``.
    Unit tests call the undecorated body as ``the_task.fn(...)``.
    """
    return task(
        name=stage,
        cache_key_fn=stage_cache_key(stage),
        persist_result=True,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_user_error,
    )


# ---- progress ---------------------------------------------------------------------------------


@contextlib.contextmanager
def observe_progress(listener: Listener) -> Iterator[None]:
    """Call ``listener(stage, done, total)`` for every stage progress report in this process."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


class StageProgress:
    """``progress(done, total)`` for one stage: listeners + a Prefect progress artifact.

    Artifact updates are throttled to one per ``min_interval`` seconds (plus the last one);
    failing to reach the Prefect API never fails the stage. ``unit``: what ``done`` counts
    (``"shards"``; training reports ``"epochs"``), named in the artifact's description.
    """

    def __init__(
        self, stage: str, fp: str = "", min_interval: float = 2.0, unit: str = "shards"
    ) -> None:
        self.stage, self.fp, self.min_interval, self.unit = stage, fp, min_interval, unit
        self.artifact_id: Any = None
        self._last = 0.0
        self._enabled = _in_prefect_run()

    def __call__(self, done: int, total: int) -> None:
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(self.stage, done, total)
        if not self._enabled:
            return
        now = time.monotonic()
        if self.artifact_id is not None and done < total and now - self._last < self.min_interval:
            return
        self._last = now
        percent = 100.0 * done / total if total else 100.0
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent,
                    key=_artifact_key(f"{self.stage}-progress"),
                    description=f"{self.unit} of stage {self.stage} {self.fp} written",
                )
            else:
                update_progress_artifact(self.artifact_id, percent)
        except Exception as exc:
            log.warning("progress artifact for %s not updated: %s", self.stage, exc)
            self._enabled = False


def table_artifact(key: str, rows: Sequence[Mapping[str, Any]], description: str = "") -> None:
    """A Prefect table artifact (no-op outside a run; API failures are only logged)."""
    if not _in_prefect_run():
        return
    try:
        create_table_artifact(
            [dict(r) for r in rows], key=_artifact_key(key), description=description
        )
    except Exception as exc:
        log.warning("table artifact %s not created: %s", key, exc)


def markdown_artifact(key: str, markdown: str, description: str = "") -> None:
    """A Prefect markdown artifact (no-op outside a run; API failures are only logged)."""
    if not _in_prefect_run():
        return
    try:
        create_markdown_artifact(markdown, key=_artifact_key(key), description=description)
    except Exception as exc:
        log.warning("markdown artifact %s not created: %s", key, exc)


def manifest_artifact(store: ArtifactStore, stage: str, fp: str) -> None:
    """A table artifact summarising a committed stage: rows, errors, shards, where."""
    m = store.require_manifest(stage, fp)
    rows = [
        {"stage": stage, "fingerprint": fp, "rows": m.rows, "error_rows": m.error_rows,
         "shards": m.num_shards, "uri": store.stage_url(stage, fp)},
    ]  # fmt: skip
    table_artifact(f"{stage}-summary", rows, description=f"stage {stage} output")


# ---- lineage ----------------------------------------------------------------------------------


def record_lineage(store: ArtifactStore, flow_run_id: str | None, record: Mapping[str, Any]) -> str:
    """Write ``runs/{flow_run_id}.json`` (which fingerprints and config a run used).

    Outside a Prefect run (no id) a time-based id is used. Returns the file's URI.
    """
    run_id = flow_run_id or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    return store.write_run(run_id, dict(record))
