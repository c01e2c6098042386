"""What every flow shares: config/store setup, the stage tasks, artifacts, lineage.

Every declared stage (:mod:`fmbseg.engine.stage`) runs as one Prefect task made by
:func:`pass_task`, its one parameter the planned :class:`~fmbseg.engine.stage.StageRun`.
The cache key is the stages' fingerprints, but only while the store really holds their
committed output, so a deleted or different store never yields a stale cache hit (the
store, not Prefect's result cache, is the source of truth; Prefect's cache makes the skip
visible in the UI). Failed stage tasks are retried (the retry resumes from the committed
shards), except for input errors that a retry cannot fix.

Progress: :class:`StageProgress` is the engine's ``progress(done, total)`` callback. Inside
a Prefect run it keeps a progress artifact up to date; in every case it forwards to the
listeners registered with :func:`observe_progress` (the CLI's progress bars).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from fmbseg.config import Config, ConfigError, load_config, replace
from fmbseg.data.datasets import DatasetError
from fmbseg.data.sources import SourceError
from fmbseg.engine.ray_cluster import RayAddressError
from fmbseg.engine.runner import add_reporter, cached_message, report
from fmbseg.engine.stage import Stage, StageRun, committed
from fmbseg.engine.stage import run as run_stages
from fmbseg.models.registry import MissingExtraError
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError
from fmbseg.segment import IncompatibleModelError
from fmbseg.storage.models import ModelNotFoundError
from fmbseg.storage.preflight import StoreUnusableError, check_store
from fmbseg.storage.store import ArtifactStore, NotCommittedError
from fmbseg.tasks.train.data import NoLabelledPatchesError

log = logging.getLogger(__name__)

# Errors in the user's input: retrying the task cannot help, and the CLI reports them
# as "fmbseg: error: ..." without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    SourceError,
    NotCommittedError,
    DatasetError,
    ModelNotFoundError,
    WeightsNotFoundError,
    CheckpointMismatchError,
    NoLabelledPatchesError,
    IncompatibleModelError,
    StoreUnusableError,
    MissingExtraError,
    RayAddressError,
)

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
    """The flow's store, checked first (a file, read-only, no bucket, no answer: one line)."""
    check_store(uri, dict(storage_options or {}))
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


# cached reports per task run, from its cache key until it ends (see _report_cached)
_pending: dict[str, list[str]] = {}
_pending_lock = threading.Lock()


def _report_cached(task_: Any, task_run: Any, state: Any) -> None:
    """Prefect ``on_completion``/``on_failure`` hook: a task Prefect served from its cache
    (the runner never ran, so it said nothing) reports "stage: cached (fingerprint ...)";
    one whose body ran has had the runner's own report."""
    with _pending_lock:
        messages = _pending.pop(str(task_run.id), [])
    if state.name == "Cached":
        for message in messages:
            report(message)


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


# a flow's planning tasks (list a source, resolve a model, fingerprint): cheap, so never
# cached; retried unless the input is at fault
PLANNING_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_unless_user_error,
}

_PASS_TASKS: dict[tuple[Stage, ...], Task[..., dict[str, str]]] = {}


def pass_task(stages: Sequence[Stage]) -> Task[..., dict[str, str]]:
    """The one Prefect task factory: the task that runs a pass of declared stages (one
    stage, or the stages that share a pass) with the planned fingerprints of its
    :class:`~fmbseg.engine.stage.StageRun` argument ``job``; returns ``{stage: fp}``.
    Unit tests call its body as ``pass_task(stages).fn(job)``. Caching and retries: see
    the module docstring."""
    declared = tuple(stages)  # by declaration, not name: each teacher has its own merge
    name = "+".join(s.name for s in declared)
    if declared not in _PASS_TASKS:

        def run_pass(job: StageRun) -> dict[str, str]:
            progress = {
                s.name: StageProgress(s.name, job.fp(s.name), unit=s.unit) for s in declared
            }
            return run_stages(declared, job, progress)

        _PASS_TASKS[declared] = task(
            name=name,
            cache_key_fn=pass_cache_key(declared),
            persist_result=True,
            retries=1,
            retry_delay_seconds=5.0,
            retry_condition_fn=retry_unless_user_error,
            on_completion=[_report_cached],
            on_failure=[_report_cached],
        )(run_pass)
    return _PASS_TASKS[declared]


def pass_cache_key(stages: Sequence[Stage]) -> Callable[[Any, dict[str, Any]], str | None]:
    """A Prefect ``cache_key_fn`` for :func:`pass_task`: ``fmbseg-{stages}-{store}-{fps}``
    once every stage's output is committed in the store, else None (run the task). Keeps
    the cached reports for :func:`_report_cached`."""
    names = "+".join(s.name for s in stages)

    def key(context: Any, parameters: dict[str, Any]) -> str | None:
        job: StageRun = parameters["job"]
        done = [m for s in stages if (m := committed(s, job)) is not None]
        if len(done) < len(stages):
            return None
        task_run = getattr(context, "task_run", None)
        if task_run is not None:  # said by _report_cached if Prefect serves the cached result
            with _pending_lock:
                _pending[str(task_run.id)] = [cached_message(job.store, m) for m in done]
        store = hashlib.sha256(job.store.uri.encode()).hexdigest()[:12]
        return f"fmbseg-{names}-{store}-{'-'.join(m.fingerprint for m in done)}"

    return key


def _to_run_log(message: str) -> None:
    """A stage report (cached / resumed / done with its counts) into the Prefect run's log."""
    if _in_prefect_run():
        from prefect import get_run_logger

        get_run_logger().info(message)


add_reporter(_to_run_log)  # every stage report of this process reaches the run's log


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


def plain(value: Any) -> str | int | float | bool:
    """A table cell as people read it, not a Python repr: ``{"cat": 3, "dog": 1}`` ->
    ``"cat 3, dog 1"``, ``["a", "b"]`` -> ``"a, b"``, None -> ``"-"``; nested dicts as
    ``"key: ..."`` groups separated by ``"; "``."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        nested = any(isinstance(v, (Mapping, list, tuple)) for v in value.values())
        if nested:
            return "; ".join(f"{k}: {plain(v)}" for k, v in value.items()) or "-"
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(plain(v)) for v in value) or "-"
    return str(value)


def image_markdown(alt: str, data: bytes, mime: str) -> str:
    """An image embedded in markdown as a ``data:`` URI: Prefect's UI renders those in
    markdown artifacts (it allows ``data:image/`` sources), while links to store files
    (``file://``, ``s3://``) do not load in a browser."""
    return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode()})"


def _publish(create: Callable[..., Any], data: Any, key: str, description: str) -> None:
    """``create(data, key=..., description=...)``, a Prefect artifact function: a no-op
    outside a run; API failures are only logged (an artifact never fails a flow)."""
    if not _in_prefect_run():
        return
    try:
        create(data, key=_artifact_key(key), description=description)
    except Exception as exc:
        log.warning("artifact %s not created: %s", key, exc)


def table_artifact(key: str, rows: Sequence[Mapping[str, Any]], description: str = "") -> None:
    """A Prefect table artifact of plain cell values (see :func:`plain`)."""
    cells = [{k: plain(v) for k, v in r.items()} for r in rows]
    _publish(create_table_artifact, cells, key, description)


def markdown_artifact(key: str, markdown: str, description: str = "") -> None:
    """A Prefect markdown artifact."""
    _publish(create_markdown_artifact, markdown, key, description)


def summary_rows(items: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A two-column summary table: one ``{"what", "value"}`` row per item, in order."""
    return [{"what": k, "value": v} for k, v in items.items()]


def manifest_artifact(store: ArtifactStore, stage: str, fp: str) -> None:
    """A table artifact summarising a committed stage: rows, errors, shards, where."""
    m = store.require_manifest(stage, fp)
    row = {
        "stage": stage,
        "fingerprint": fp,
        "rows": m.rows,
        "error_rows": m.error_rows,
        "shards": m.num_shards,
        "uri": store.stage_url(stage, fp),
    }
    table_artifact(f"{stage}-summary", [row], description=f"stage {stage} output")


# ---- lineage ----------------------------------------------------------------------------------


def _run_times() -> dict[str, Any]:
    """``started_at`` (when the flow run's context was entered), ``ended_at`` (now), and the
    duration between them; ``started_at`` is None outside a flow run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    end = _dt.datetime.now(_dt.UTC)
    if ctx is None:
        return {"started_at": None, "ended_at": end.isoformat(), "duration_s": None}
    start = ctx.start_time
    return {
        "started_at": start.isoformat(),
        "ended_at": end.isoformat(),
        "duration_s": round((end - start).total_seconds(), 3),
    }


def _parent_run() -> str | None:
    """The flow run that called this one as a subflow (``annotate-and-train`` -> ``train``)."""
    if not _in_prefect_run():
        return None
    try:
        from prefect.runtime import flow_run

        parent = flow_run.parent_flow_run_id
    except Exception as exc:  # the API is unreachable: lineage without the parent
        log.warning("parent flow run not found: %s", exc)
        return None
    return str(parent) if parent else None


def record_lineage(store: ArtifactStore, flow_run_id: str | None, record: Mapping[str, Any]) -> str:
    """Write ``runs/{flow_run_id}.json``: which fingerprints and config a run used, when it
    started and ended, its outcome (``completed``) and its parent run (a subflow's caller).

    Outside a Prefect run (no id) a time-based id is used. Returns the file's URI.
    """
    run_id = flow_run_id or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    full = {"outcome": "completed", **_run_times(), "parent_run": _parent_run(), **record}
    return store.write_run(run_id, full)


def flow_lineage(store: ArtifactStore, flow: str, **record: Any) -> str:
    """:func:`record_lineage` of the running flow ``flow``; ``record``: what it used."""
    return record_lineage(store, current_flow_run_id(), {"flow": flow, **record})


def record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure``/``on_crashed`` hook: ``runs/{id}.json`` with outcome ``failed``
    (or ``crashed``), start, end and the error, so a failed run is listed too. Never raises:
    a store that cannot be written must not hide the run's own error."""
    try:
        params = dict(flow_run.parameters or {})
        if not isinstance(params.get("store"), str):
            return
        store = open_store(params["store"], params.get("storage_options"))
        times = _run_times()
        if flow_run.start_time is not None and times["started_at"] is None:
            times["started_at"] = flow_run.start_time.isoformat()
        store.write_run(
            str(flow_run.id),
            {
                **times,
                "outcome": str(state.type.value).lower(),
                "flow": flow.name,
                "parent_run": _parent_run(),
                "error": str(state.message or "")[:2000],
                "parameters": {k: v for k, v in params.items() if k != "storage_options"},
            },
        )
    except Exception as exc:
        log.warning("failed run not recorded in the store: %s", exc)


# every flow: @flow(name=..., **LINEAGE_HOOKS)
LINEAGE_HOOKS: dict[str, Any] = {"on_failure": [record_failure], "on_crashed": [record_failure]}
