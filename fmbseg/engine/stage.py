"""A stage declared once: what its fingerprint covers, how it is sharded and what runs it.

A :class:`Stage` names its upstream stages, the config parts its output depends on, the
code version, whether it needs a GPU, and its ``prepare`` function: given a
:class:`StageRun` (the store, the config, every planned fingerprint, the user's inputs) it
returns the shard specs, the worker factory (built once per executor slot, models loaded
once) and the manifest meta. A stage that is one process's loop rather than shards
(training: epochs, checkpoints) declares a ``body`` instead, which commits its own output.
:func:`plan` computes every fingerprint of a list of stages once, before anything runs;
:func:`run` executes one stage (or the stages that share one pass) with
:func:`fmbseg.engine.runner.run_stages`: skip what is committed, resume, shard locally or on
Ray, commit. Nothing about a stage's plumbing is written per stage.

Stages that share one pass (``together``: the two SAM stages share SAM's image embedding)
keep their own fingerprints, shards and manifests; the pass writes only those not yet
committed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fmbseg.config import Config
from fmbseg.engine.runner import Finalize, Progress, cached_message, counts, report, run_stages
from fmbseg.engine.slot import ShardWorker
from fmbseg.storage.fingerprint import fingerprint
from fmbseg.storage.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    from fmbseg.data.image_labels import ImageLabels


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What a stage run reads besides its shards: small and picklable (workers get it).

    ``fps`` holds the planned fingerprints; a running stage sees its inputs' and its own
    (those of ``targets``).
    ``vocabulary`` and ``image_labels`` are the user's class names and image-level tags
    (the stages after clip_dense read the vocabulary from its manifest); ``given`` is
    what else the user chose for a stage (the evaluated split and model, the label sets
    training reads), picklable (tests also put their small stand-in models there).
    """

    store: ArtifactStore
    cfg: Config
    fps: Mapping[str, str]
    vocabulary: tuple[str, ...] = ()
    image_labels: ImageLabels | None = None
    storage_options: dict[str, Any] | None = None
    targets: tuple[str, ...] = ()  # the stages this pass writes (set by :func:`run`)
    given: Any = None

    def fp(self, stage: str) -> str:
        return self.fps[stage]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A stage's work, ready for the runner: ``specs[i]`` describes shard ``i``'s input;
    ``worker()`` builds one :class:`ShardWorker` (picklable: it is shipped to Ray actors)."""

    specs: Sequence[Any]
    worker: Callable[[], ShardWorker]
    meta: dict[str, Any]
    finalize: Finalize | None = None  # after the shards, before the commit (index's dedup)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One declared stage.

    Attributes:
        name: the store folder and the Prefect task's name.
        version: the code version (bump when the output's format or meaning changes).
        inputs: upstream stages whose fingerprints this one's covers.
        parts: ``parts(run) -> dict``: the config (and user inputs) the output depends
            on; execution-only fields (batch sizes) are left out, so changing them reuses
            committed outputs.
        prepare: ``prepare(run) -> Prepared`` (``run.targets``: the stages this pass writes).
        body: instead of ``prepare``, ``body(run, progress)`` runs the stage in this
            process and commits ``stages/{name}/{fp}`` itself (training's epoch loop);
            ``progress`` is the stage's ``progress(done, total)`` callback or None.
        gpu: reserve GPUs for the stage's Ray actors (where the cluster has any).
        together: stages that run in one pass with this one (itself included).
        complete: ``complete(run) -> bool``: the stage's output is whole beyond its manifest
            (export's files); default: the manifest is committed.
        before: ``before(run)``: once before an incomplete stage (re)runs, whether shards
            remain or only ``finish`` does (export clears a killed run's temp files).
        finish: ``finish(run)``: after the commit (export writes its dataset files).
        timed: record the pass's wall time in the manifest meta.
        named: ``named(run) -> {name: fingerprint or content hash}``: inputs that are not
            upstream stages of this list (training's label sets, its initial model, the
            vocabulary's hash), hashed beside ``inputs``.
        unit: what the stage's ``progress(done, total)`` counts (a body stage: its own).
    """

    name: str
    version: str
    inputs: tuple[str, ...]
    parts: Callable[[StageRun], dict[str, Any]]
    prepare: Callable[[StageRun], Prepared] | None = None
    body: Callable[[StageRun, Progress | None], None] | None = None
    gpu: bool = False
    together: tuple[str, ...] = ()
    complete: Callable[[StageRun], bool] | None = None
    before: Callable[[StageRun], None] | None = None
    finish: Callable[[StageRun], None] | None = None
    timed: bool = False
    named: Callable[[StageRun], Mapping[str, str]] | None = None
    unit: str = "shards"

    def __post_init__(self) -> None:
        if (self.prepare is None) == (self.body is None):
            raise ValueError(f"stage {self.name}: declare exactly one of prepare and body")

    def fingerprint(self, run: StageRun) -> str:
        """hash(name, version, parts, input fingerprints): the stage's output version."""
        inputs = {s: run.fps[s] for s in self.inputs}
        if self.named is not None:
            inputs.update(self.named(run))
        return fingerprint(self.name, self.version, self.parts(run), inputs)


def plan(stages: Sequence[Stage], job: StageRun) -> dict[str, str]:
    """Every fingerprint of ``stages`` (in order, each after its inputs), computed once,
    before anything runs; ``job.fps`` gives the ones already known (``index``)."""
    fps = dict(job.fps)
    for stage in stages:
        missing = [s for s in stage.inputs if s not in fps]
        if missing:
            raise ValueError(f"stage {stage.name}: no fingerprint for its inputs {missing}")
        fps[stage.name] = stage.fingerprint(dataclasses.replace(job, fps=fps))
    return fps


def committed(stage: Stage, job: StageRun) -> Manifest | None:
    """The stage's manifest when its output is whole (see :attr:`Stage.complete`)."""
    manifest = job.store.manifest(stage.name, job.fp(stage.name))
    return manifest if manifest is not None and _whole(stage, job) else None


def _whole(stage: Stage, job: StageRun) -> bool:
    return stage.complete is None or stage.complete(job)


def run(
    stages: Sequence[Stage],
    job: StageRun,
    progress: Mapping[str, Progress] | None = None,
) -> dict[str, str]:
    """Run (or reuse) ``stages``, which share one pass, with the planned ``job.fps``.

    Each stage whose output is whole is reported as cached and skipped; the others run in
    one pass of the first one's worker, which sees its inputs' fingerprints and those of
    the stages it writes (``job.targets``). Returns ``{stage: fingerprint}``.
    """
    progress = progress or {}
    store = job.store
    todo: list[Stage] = []
    shards_left = False  # False: every todo stage is committed, only its finish is left
    for stage in stages:
        manifest = store.manifest(stage.name, job.fp(stage.name))
        if manifest is not None and _whole(stage, job):
            report(cached_message(store, manifest))
            # a body stage's total (epochs) is its own: a reused one reports none
            if stage.prepare is not None and (p := progress.get(stage.name)) is not None:
                p(manifest.num_shards, manifest.num_shards)
            continue
        todo.append(stage)
        shards_left = shards_left or manifest is None
    if not todo:
        return {s.name: job.fp(s.name) for s in stages}
    names = {s.name for s in todo} | {i for s in todo for i in s.inputs}
    pass_run = dataclasses.replace(
        job,
        fps={k: v for k, v in job.fps.items() if k in names},
        targets=tuple(s.name for s in todo),
    )
    for stage in todo:
        if stage.before is not None:
            stage.before(pass_run)
    if shards_left and (body := todo[0].body) is not None:
        (stage,) = todo  # a body stage runs alone
        body(pass_run, progress.get(stage.name))
        manifest = store.require_manifest(stage.name, job.fp(stage.name))
        report(
            f"{stage.name}: done (fingerprint {manifest.fingerprint}), {counts(store, manifest)}"
        )
    elif shards_left:
        assert todo[0].prepare is not None
        prepared = todo[0].prepare(pass_run)
        # one callback given for several stages is called once a shard
        listeners = list({id(p): p for s in todo if (p := progress.get(s.name))}.values())

        def each(done: int, total: int) -> None:
            for listener in listeners:
                listener(done, total)

        run_stages(
            store,
            [(s.name, job.fp(s.name)) for s in todo],
            prepared.specs,
            prepared.worker,
            job.cfg.runtime,
            use_gpu=any(s.gpu for s in todo),
            progress=each,
            meta=prepared.meta,
            finalize=prepared.finalize,
            timed=any(s.timed for s in todo),
        )
    for stage in todo:
        if stage.finish is not None:
            stage.finish(pass_run)
    return {s.name: job.fp(s.name) for s in stages}
