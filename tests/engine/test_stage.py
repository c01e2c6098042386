"""Declared stages: planning fingerprints once, skipping what is committed, body stages."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from fmbseg.config import load_config, replace
from fmbseg.engine.runner import add_reporter
from fmbseg.engine.stage import Prepared, Stage, StageRun, committed, plan, run
from fmbseg.storage import ArtifactStore
from fmbseg.storage.fingerprint import fingerprint


class Doubler:
    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
        return pa.table({"x": [2 * v for v in spec]}), pa.table({"uri": pa.array([], pa.string())})


def _prepare(job: StageRun) -> Prepared:
    return Prepared(specs=[[1, 2], [3]], worker=Doubler, meta={"given": job.given})


def _trainer(calls: list[Any]) -> Any:
    def body(job: StageRun, progress: Any) -> None:
        calls.append(job.given)
        if progress is not None:
            progress(1, 1)
        job.store.commit("fit", job.fp("fit"), 0, meta={"model": "m", "version": "v0001"})

    return body


def _stages(calls: list[Any]) -> tuple[Stage, Stage]:
    double = Stage(
        "double", "1", inputs=("source",), parts=lambda j: {"k": j.given}, prepare=_prepare
    )
    fit = Stage("fit", "3", inputs=("double",), parts=lambda j: {}, body=_trainer(calls))
    return double, fit


@pytest.fixture
def job(tmp_path: Any) -> StageRun:
    cfg = replace(load_config("tiny"), runtime={"executor": "local"})
    return StageRun(ArtifactStore(str(tmp_path)), cfg, {"source": "abc"}, given=7)


def test_plan_is_the_stage_fingerprint_over_its_inputs(job: StageRun) -> None:
    double, fit = _stages([])
    fps = plan([double, fit], job)
    assert fps["double"] == fingerprint("double", "1", {"k": 7}, {"source": "abc"})
    assert fps["fit"] == fingerprint("fit", "3", {}, {"double": fps["double"]})
    named = Stage(
        "fit", "3", (), parts=lambda j: {}, body=_trainer([]), named=lambda j: {"set": "s1"}
    )
    assert named.fingerprint(job) == fingerprint("fit", "3", {}, {"set": "s1"})
    with pytest.raises(ValueError, match=r"stage fit: no fingerprint for its inputs \['double'\]"):
        plan([fit], job)


def test_run_commits_then_reports_cached(job: StageRun) -> None:
    calls: list[Any] = []
    double, fit = _stages(calls)
    job = StageRun(job.store, job.cfg, plan([double, fit], job), given=7)
    messages: list[str] = []
    remove = add_reporter(messages.append)
    ticks: list[tuple[int, int]] = []
    try:
        run([double], job)
        run([fit], job, {"fit": lambda d, t: ticks.append((d, t))})
        assert committed(fit, job) is not None
        assert job.store.read_table("double", job.fp("double")).column("x").to_pylist() == [2, 4, 6]
        assert job.store.require_manifest("double", job.fp("double")).meta["given"] == 7
        assert calls == [7] and ticks == [(1, 1)]
        assert messages[-1].startswith(f"fit: done (fingerprint {job.fp('fit')})")
        assert "model m:v0001" in messages[-1]
        run([double], job)
        run([fit], job)
    finally:
        remove()
    assert calls == [7]  # the committed body stage did not run again
    assert messages[-2].startswith(f"double: cached (fingerprint {job.fp('double')}), 2 shards")
    assert messages[-1].startswith(f"fit: cached (fingerprint {job.fp('fit')})")


def test_a_stage_declares_prepare_or_body_not_both() -> None:
    with pytest.raises(ValueError, match="stage s: declare exactly one of prepare and body"):
        Stage("s", "1", inputs=(), parts=lambda j: {})
    with pytest.raises(ValueError, match="exactly one"):
        Stage("s", "1", inputs=(), parts=lambda j: {}, prepare=_prepare, body=_trainer([]))
