"""Stage 1's stages, declared once for the engine (:mod:`fmbseg.engine.stage`).

``index`` (:data:`fmbseg.tasks.annotate.index.INDEX`) is declared beside its core, because
:func:`~fmbseg.tasks.annotate.index.run_index` there runs it and this module imports the
stages' modules.

To add a stage: write its core and worker in a module of this package, with a
``prepare(job) -> Prepared`` beside them, and declare it here (its inputs, the config it
depends on, its code version); put it in :data:`STAGE1` after its inputs. The engine gives
it fingerprinting, skip/resume, sharding on Ray, commits, progress and a Prefect task.

Fingerprints hash the config a stage's output depends on and its inputs' fingerprints,
nothing else: execution-only fields (``clip_dense.batch_size``,
``sam_auto.points_per_batch``) are left out, so changing them reuses committed outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fmbseg.config import Config, ConfigError
from fmbseg.data.image_labels import ImageLabels
from fmbseg.engine.runner import Progress
from fmbseg.engine.stage import Stage, StageRun, plan, run
from fmbseg.models.locate import locate_weights
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate import clip_dense, export, merge, sam3, sam_pair
from fmbseg.tasks.annotate.common import INDEX_STAGE, teacher


def _without(section: Any, *fields: str) -> dict[str, Any]:
    d = dataclasses.asdict(section)
    for f in fields:
        d.pop(f)
    return d


def _clip_parts(job: StageRun) -> dict[str, Any]:
    m = job.cfg.models
    parts: dict[str, Any] = {
        "clip_dense": _without(job.cfg.clip_dense, "batch_size"),
        "models": {
            "clip": m.clip,
            "clip_weights": m.clip_weights,
            "clip_quick_gelu": m.clip_quick_gelu,
        },
        "vocabulary": list(job.vocabulary),
    }
    if job.image_labels is not None:  # tags replace CLIP's presence vote
        parts["image_labels"] = job.image_labels.fingerprint_part()
    return parts


SAM_PASS = ("sam_prompt", "sam_auto")

CLIP_DENSE = Stage(
    "clip_dense",
    "2",  # 2: plain bicubic positional-embedding resize
    inputs=(INDEX_STAGE,),
    parts=_clip_parts,
    prepare=clip_dense.prepare,
    gpu=True,
)
SAM_PROMPT = Stage(
    "sam_prompt",
    "1",
    inputs=("clip_dense",),
    parts=lambda job: {"sam_prompt": job.cfg.sam_prompt, "models": teacher(job.cfg)},
    prepare=sam_pair.prepare,
    gpu=True,
    together=SAM_PASS,
    timed=True,
)
SAM_AUTO = dataclasses.replace(
    SAM_PROMPT,
    name="sam_auto",
    parts=lambda job: {
        "sam_auto": _without(job.cfg.sam_auto, "points_per_batch"),
        "models": teacher(job.cfg),
    },
)
MERGE = Stage(
    "merge",
    "1",
    inputs=(INDEX_STAGE, "clip_dense", "sam_prompt", "sam_auto"),
    parts=lambda job: {"merge": job.cfg.merge},
    prepare=merge.prepare,
)
EXPORT = Stage(
    "export",
    "2",
    inputs=("merge",),
    parts=lambda job: {"export": job.cfg.export},
    prepare=export.prepare,
    complete=export.complete,
    before=export.sweep,
    finish=export.finish,
)

STAGE1: tuple[Stage, ...] = (CLIP_DENSE, SAM_PROMPT, SAM_AUTO, MERGE, EXPORT)

# models.teacher: sam3 -- SAM 3's text concepts replace CLIP's presence vote and both SAM
# stages; merge paints its masks into the same label maps and export is the same stage.
SAM3 = Stage(
    "sam3",
    "1",
    inputs=(INDEX_STAGE,),
    parts=lambda job: {
        "sam3": job.cfg.sam3,
        "models": sam3.teacher(job.cfg),
        "vocabulary": list(job.vocabulary),
    },
    prepare=sam3.prepare,
    gpu=True,
    timed=True,
)
MERGE_SAM3 = dataclasses.replace(MERGE, inputs=(INDEX_STAGE, "sam3"))
STAGE1_SAM3: tuple[Stage, ...] = (SAM3, MERGE_SAM3, EXPORT)

TEACHERS: dict[str, tuple[Stage, ...]] = {"clip_sam": STAGE1, "sam3": STAGE1_SAM3}


def stage1(cfg: Config) -> tuple[Stage, ...]:
    """The stage-1 stages of ``cfg``'s teacher (``models.teacher``), in order."""
    return TEACHERS[cfg.models.teacher]


def check_teacher(
    cfg: Config,
    image_labels: object = None,
    *,
    also: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Before any work, in seconds: the teacher's optional package is installed (SAM 3: the
    ``sam3`` extra; :class:`~fmbseg.models.registry.MissingExtraError` with the hint),
    image-level tags (which replace CLIP's presence vote) come with the CLIP teacher, and
    the weights of the teacher's models and of the kinds in ``also`` can be found
    (:func:`~fmbseg.models.locate.locate_weights`)."""
    kinds: tuple[str, ...] = ("clip", "sam")
    if cfg.models.teacher == "sam3":
        if image_labels is not None:
            raise ConfigError(
                "image labels replace CLIP's presence vote, and models.teacher sam3 has no"
                " CLIP stage (SAM 3 decides presence itself): drop --image-labels or the"
                " sam3 teacher"
            )
        from fmbseg.models.sam3 import require_package

        require_package(cfg.models.sam3)
        kinds = ("sam3",)
    locate_weights(cfg.models, tuple(dict.fromkeys((*kinds, *also))), storage_options)


def passes(stages: Sequence[Stage] = STAGE1) -> list[tuple[Stage, ...]]:
    """``stages`` grouped into the passes that run them (the SAM pair is one)."""
    out: list[tuple[Stage, ...]] = []
    for stage in stages:
        if stage.together and out and out[-1][0].together == stage.together:
            out[-1] += (stage,)
        else:
            out.append((stage,))
    return out


def stage_run(
    store: ArtifactStore,
    cfg: Config,
    index_fp: str,
    vocabulary: Sequence[str],
    *,
    storage_options: dict[str, Any] | None = None,
    image_labels: ImageLabels | None = None,
) -> StageRun:
    """A stage-1 run over the committed index ``index_fp`` with every fingerprint planned."""
    job = StageRun(
        store, cfg, {INDEX_STAGE: index_fp}, tuple(vocabulary), image_labels, storage_options
    )
    return dataclasses.replace(job, fps=plan(stage1(cfg), job))


def stage1_fingerprints(
    cfg: Config,
    index_fp: str,
    vocabulary: Sequence[str],
    image_labels: ImageLabels | None = None,
) -> dict[str, str]:
    """Every stage-1 fingerprint after ``index``, before running anything."""
    job = stage_run(None, cfg, index_fp, vocabulary, image_labels=image_labels)  # type: ignore[arg-type]
    return {stage: fp for stage, fp in job.fps.items() if stage != INDEX_STAGE}


def _named(cfg: Config, names: Sequence[str]) -> list[Stage]:
    """The declared stages called ``names`` among ``cfg``'s teacher's stage-1 stages."""
    by_name = {s.name: s for s in stage1(cfg)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"unknown stage-1 stage(s) {unknown} for teacher {cfg.models.teacher!r};"
            f" known {list(by_name)}"
        )
    return [by_name[n] for n in names]


def stage_fingerprint(
    stage: str,
    cfg: Config,
    inputs: dict[str, str],
    vocabulary: Sequence[str] | None = None,
    image_labels: ImageLabels | None = None,
) -> str:
    """The fingerprint of the stage-1 stage named ``stage`` on ``inputs``."""
    (declared,) = _named(cfg, (stage,))
    job = StageRun(None, cfg, inputs, tuple(vocabulary or ()), image_labels)  # type: ignore[arg-type]
    return declared.fingerprint(job)


def run_declared(
    store: ArtifactStore,
    cfg: Config,
    stages: str | Sequence[str],
    inputs: Mapping[str, str],
    *,
    vocabulary: Sequence[str] = (),
    image_labels: ImageLabels | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | Mapping[str, Progress] | None = None,
) -> dict[str, str]:
    """Run (or reuse) the named stage-1 stage(s) on committed ``inputs`` (``{stage: fp}``)
    in one pass; returns ``{stage: fp}``. ``vocabulary`` (and ``image_labels``) are for
    clip_dense; ``progress(done, total)`` (or one per stage) counts the pass's shards."""
    names = (stages,) if isinstance(stages, str) else tuple(stages)
    declared = _named(cfg, names)
    job = StageRun(store, cfg, dict(inputs), tuple(vocabulary), image_labels, storage_options)
    job = dataclasses.replace(job, fps=plan(declared, job))
    if progress is not None and not isinstance(progress, Mapping):
        progress = {n: progress for n in names}
    return run(declared, job, progress)
