"""The shard runner: planning, local and Ray executors, resume, failures."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray.cloudpickle

from fmbseg.config import ConfigError, RuntimeConfig
from fmbseg.engine.runner import (
    StageError,
    add_reporter,
    counts,
    errors_table,
    plan_shards,
    run_stage,
    run_stages,
    stage_images,
)
from fmbseg.engine.slot import SLOT_DEPTH, ShardSlot
from fmbseg.storage import ArtifactStore

# Workers defined here must reach Ray worker processes, which cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOCAL = RuntimeConfig(executor="local")
RAY = RuntimeConfig(executor="ray", num_workers=2, cpus_per_worker=1.0, max_retries=2)


def _specs(n_items: int = 10, shard_size: int = 3) -> list[list[int]]:
    return [list(r) for r in plan_shards(n_items, shard_size)]


class SquareWorker:
    """Records ``item, square``; negative items are bad inputs -> error rows."""

    def __init__(self, marker_dir: str | None = None, die_on: int | None = None) -> None:
        self.marker_dir, self.die_on = marker_dir, die_on
        self.pid = os.getpid()

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
        if shard == self.die_on and self.marker_dir is not None:
            marker = Path(self.marker_dir) / f"died-{shard}"
            if not marker.exists():  # first attempt only: the process vanishes mid-shard
                marker.touch()
                os._exit(1)
        good = [i for i in spec if i >= 0]
        bad = [i for i in spec if i < 0]
        records = pa.table(
            {
                "item": pa.array(good, pa.int64()),
                "square": pa.array([i * i for i in good], pa.int64()),
                "pid": pa.array([self.pid] * len(good), pa.int64()),
            }
        )
        errors = errors_table(
            [
                {
                    "uri": f"item-{i}",
                    "image_id": None,
                    "stage": "sq",
                    "error_type": "negative",
                    "message": f"{i} < 0",
                }
                for i in bad
            ]
        )
        return records, errors


class AlwaysDies:
    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        os._exit(1)


class Buggy:
    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        if shard == 2:
            raise KeyError("missing column 'x'")
        return pa.table({"item": spec}), None


class SlowOnShardZero:
    """Shard 0 lasts until 9 other shards are done (markers in ``marker_dir``)."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = Path(marker_dir)

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        deadline = time.monotonic() + 60
        while shard == 0 and len(list(self.marker_dir.iterdir())) < 9:
            assert time.monotonic() < deadline, "the other shards did not get past shard 0"
            time.sleep(0.05)
        (self.marker_dir / f"done-{shard}").touch()
        return pa.table({"shard": [shard], "pid": [os.getpid()]}), None


def _broken_factory() -> SquareWorker:
    raise RuntimeError("weights file not found: /nope.pth")


def _summary(manifest) -> list[tuple]:
    return [(r.shard, r.rows, r.error_rows, r.sha256, r.errors_sha256) for r in manifest.shards]


# ---- planning --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "size"), [(10, 3), (7, 7), (8, 3), (1, 5), (256, 256), (257, 256)])
def test_plan_shards_balanced_and_complete(n: int, size: int) -> None:
    shards = plan_shards(n, size)
    assert len(shards) == -(-n // size)
    assert [i for r in shards for i in r] == list(range(n))
    lengths = [len(r) for r in shards]
    assert max(lengths) - min(lengths) <= 1
    assert max(lengths) <= size
    assert plan_shards(n, size) == shards


def test_plan_shards_edge_cases() -> None:
    assert plan_shards(0, 4) == []
    assert [len(r) for r in plan_shards(10, 4)] == [4, 3, 3]
    with pytest.raises(ValueError, match="shard_size must be >= 1, got 0"):
        plan_shards(5, 0)
    with pytest.raises(ValueError, match="n_items must be >= 0"):
        plan_shards(-1, 3)


# ---- local executor --------------------------------------------------------------------------


def test_local_run_commits_records_and_errors(local_store: ArtifactStore) -> None:
    specs = [[0, 1, -1], [2, 3], [-2, -3]]
    seen: list[tuple[int, int]] = []
    manifest = run_stage(
        local_store,
        "sq",
        "fp",
        specs,
        SquareWorker,
        LOCAL,
        progress=lambda d, t: seen.append((d, t)),
        meta={"k": "v"},
    )
    assert (manifest.num_shards, manifest.rows, manifest.error_rows) == (3, 4, 3)
    assert manifest.meta == {"k": "v"}
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    table = local_store.read_table("sq", "fp")
    assert table.column("square").to_pylist() == [0, 1, 4, 9]
    errors = local_store.read_table("sq", "fp", kind="errors")
    assert errors.column("uri").to_pylist() == ["item--1", "item--2", "item--3"]


def test_committed_stage_is_not_rerun(local_store: ArtifactStore) -> None:
    first = run_stage(local_store, "sq", "fp", _specs(), SquareWorker, LOCAL)

    def must_not_build() -> SquareWorker:
        raise AssertionError("the worker factory ran for a committed stage")

    again = run_stage(local_store, "sq", "fp", _specs(), must_not_build, LOCAL)
    assert again == first


def test_resume_skips_shards_with_receipts(local_store: ArtifactStore) -> None:
    specs = _specs(10, 3)  # 4 shards
    worker = SquareWorker()
    for shard in (0, 2):  # an earlier, interrupted run wrote these
        local_store.write_shard("sq", "fp", shard, *worker.process(shard, specs[shard]))
    calls: list[int] = []

    class Counting(SquareWorker):
        def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
            calls.append(shard)
            return super().process(shard, spec)

    seen: list[tuple[int, int]] = []
    manifest = run_stage(
        local_store, "sq", "fp", specs, Counting, LOCAL, progress=lambda d, t: seen.append((d, t))
    )
    assert calls == [1, 3]
    assert seen == [(2, 4), (3, 4), (4, 4)]
    assert local_store.read_table("sq", "fp").column("item").to_pylist() == list(range(10))
    assert manifest.rows == 10


def test_a_timed_run_records_its_wall_time_and_the_shards_it_ran(local_store, monkeypatch) -> None:
    import fmbseg.engine.runner as runner

    clock = iter([100.0, 102.5])  # the start, then the end of running the shards
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    specs = _specs(10, 3)  # 4 shards; one written by an interrupted run
    local_store.write_shard("sq", "fp", 1, *SquareWorker().process(1, specs[1]))
    manifest = run_stage(
        local_store, "sq", "fp", specs, SquareWorker, LOCAL, meta={"k": "v"}, timed=True
    )
    assert manifest.meta == {
        "k": "v",
        "timing": {"wall_s": 2.5, "shards_run": 3, "shards": 4, "outputs": {"sq": "fp"}},
    }


def test_a_rerun_says_what_it_reused_resumed_and_committed(local_store: ArtifactStore) -> None:
    specs = _specs(10, 3) + [[-1, -2]]  # 5 shards, the last one two bad inputs
    for shard in (0, 2):  # an earlier, interrupted run wrote these
        local_store.write_shard("sq", "fp1", shard, *SquareWorker().process(shard, specs[shard]))
    said: list[str] = []
    remove = add_reporter(said.append)
    try:
        run_stage(local_store, "sq", "fp1", specs, SquareWorker, LOCAL)
        assert said == [
            "sq: resumed, 2 of 5 shards already committed",
            "sq: done (fingerprint fp1), 5 shards, 10 records, 2 errors",
        ]
        said.clear()
        run_stage(local_store, "sq", "fp1", specs, SquareWorker, LOCAL)
        assert said == ["sq: cached (fingerprint fp1), 5 shards, 10 records, 2 errors"]
    finally:
        remove()
    said.clear()
    run_stage(local_store, "sq", "fp2", specs, SquareWorker, LOCAL)
    assert said == []  # a removed reporter hears nothing


def test_reports_count_the_images_of_the_index_a_stage_names(local_store: ArtifactStore) -> None:
    index = run_stage(local_store, "index", "i1", _specs(7, 3), SquareWorker, LOCAL)
    later = run_stage(
        local_store, "sq", "s1", _specs(4, 2), SquareWorker, LOCAL, meta={"index": "i1"}
    )
    assert stage_images(local_store, index) == 7 and stage_images(local_store, later) == 7
    assert counts(local_store, later) == "2 shards, 7 images, 4 records, 0 errors"
    meta = {"model": "fmbseg-align", "version": "v0001"}
    train = run_stage(local_store, "train", "t1", [], SquareWorker, LOCAL, meta=meta)
    assert counts(local_store, train) == "model fmbseg-align:v0001"


def test_the_commit_uses_the_receipts_the_run_listed_and_wrote(local_store, monkeypatch) -> None:
    specs = _specs(10, 3)  # 4 shards
    earlier = local_store.write_shard("sq", "fp", 1, *SquareWorker().process(1, specs[1]))
    listings: list[str] = []
    real = ArtifactStore.shard_receipts

    def counted(self: ArtifactStore, stage: str, fp: str) -> dict:
        listings.append(stage)
        return real(self, stage, fp)

    monkeypatch.setattr(ArtifactStore, "shard_receipts", counted)
    manifest = run_stage(local_store, "sq", "fp", specs, SquareWorker, LOCAL)
    assert listings == ["sq"]  # once, to resume; the commit does not read them back
    assert manifest.shards[1] == earlier
    assert [r.shard for r in manifest.shards] == [0, 1, 2, 3]
    assert manifest.shards == [real(local_store, "sq", "fp")[i] for i in range(4)]
    assert manifest.rows == 10


def test_bug_in_process_names_the_shard(local_store: ArtifactStore) -> None:
    with pytest.raises(StageError, match=r"stage 'sq' \(fp\): shard 2 failed: KeyError"):
        run_stage(local_store, "sq", "fp", _specs(), Buggy, LOCAL)
    assert sorted(local_store.shard_receipts("sq", "fp")) == [0, 1]  # kept for the rerun
    assert local_store.manifest("sq", "fp") is None


def test_wrong_return_type_is_reported(local_store: ArtifactStore) -> None:
    class ReturnsList:
        def process(self, shard: int, spec: list[int]) -> list[int]:
            return spec

    with pytest.raises(StageError, match=r"shard 0 failed: TypeError: ReturnsList.process must"):
        run_stage(local_store, "sq", "fp", _specs(), ReturnsList, LOCAL)


def test_finalize_runs_before_commit_and_extends_meta(local_store: ArtifactStore) -> None:
    def finalize(store: ArtifactStore, stage: str, fp: str, receipts: dict) -> dict:
        assert store.manifest(stage, fp) is None  # not committed yet
        assert receipts == store.shard_receipts(stage, fp) and sorted(receipts) == [0, 1, 2, 3]
        # a rewritten shard's new receipt goes into the dict, and the commit uses it
        receipts[2] = store.write_shard(stage, fp, 2, *SquareWorker().process(2, [7]))
        return {"checked": len(receipts)}

    m = run_stage(
        local_store, "sq", "fp", _specs(), SquareWorker, LOCAL, meta={"a": 1}, finalize=finalize
    )
    assert m.meta == {"a": 1, "checked": 4}
    assert local_store.read_shard("sq", "fp", 2, manifest=m).column("square").to_pylist() == [49]


def test_unknown_executor() -> None:
    # the config cannot hold one, so no stage is ever handed one
    with pytest.raises(
        ConfigError, match=r"^runtime\.executor: 'dask' is not one of \['ray', 'local'\]$"
    ):
        RuntimeConfig(executor="dask")  # type: ignore[arg-type]


def test_zero_shards_commit_an_empty_stage(local_store: ArtifactStore) -> None:
    m = run_stage(local_store, "sq", "fp", [], SquareWorker, LOCAL)
    assert (m.num_shards, m.rows) == (0, 0)
    assert local_store.is_committed("sq", "fp")


# ---- a slot keeps its worker busy: prefetch hints, writes overlapping the next shard -------


class Recording:
    """Logs ``prefetch``/``process`` calls; shard 1 says when it starts (see the write test)."""

    events: list[tuple[str, int]] = []
    started_1 = threading.Event()

    def prefetch(self, shard: int, spec: list[int]) -> None:
        self.events.append(("prefetch", shard))

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        self.events.append(("process", shard))
        if shard == 1:
            self.started_1.set()
        return pa.table({"item": pa.array(spec, pa.int64())}), None


def test_local_slot_prefetches_the_next_shard_and_processes_in_order(local_store) -> None:
    Recording.events = []
    run_stage(local_store, "sq", "fp", _specs(10, 3), Recording, LOCAL)
    assert Recording.events == [
        ("prefetch", 1),
        ("process", 0),
        ("prefetch", 2),
        ("process", 1),
        ("prefetch", 3),
        ("process", 2),
        ("process", 3),
    ]
    assert local_store.read_table("sq", "fp").column("item").to_pylist() == list(range(10))


def test_local_slot_writes_a_shard_while_the_next_is_processed(local_store, monkeypatch) -> None:
    Recording.started_1.clear()
    overlapped = []
    write_shard = local_store.write_shard

    def slow_write(stage: str, fp: str, shard: int, *tables: Any) -> Any:
        if shard == 0:  # a synchronous write would wait here for a shard that never starts
            overlapped.append(Recording.started_1.wait(timeout=10))
        return write_shard(stage, fp, shard, *tables)

    monkeypatch.setattr(local_store, "write_shard", slow_write)
    progress: list[int] = []
    m = run_stage(
        local_store,
        "sq",
        "fp",
        _specs(10, 3),
        Recording,
        LOCAL,
        progress=lambda done, total: progress.append(done),
    )
    assert overlapped == [True]
    assert progress == [0, 1, 2, 3, 4]  # a shard counts once its receipt is written
    assert m.rows == 10


def test_a_failed_write_names_its_shard_and_keeps_the_written_ones(
    local_store, monkeypatch
) -> None:
    write_shard = local_store.write_shard

    def failing_write(stage: str, fp: str, shard: int, *tables: Any) -> Any:
        if shard == 2:
            raise OSError("disk full")
        return write_shard(stage, fp, shard, *tables)

    monkeypatch.setattr(local_store, "write_shard", failing_write)
    with pytest.raises(StageError, match=r"shard 2 failed: OSError: disk full") as failure:
        run_stage(local_store, "sq", "fp", _specs(10, 3), SquareWorker, LOCAL)
    assert isinstance(failure.value.cause, OSError)
    assert sorted(local_store.shard_receipts("sq", "fp")) == [0, 1]
    assert local_store.manifest("sq", "fp") is None


def test_the_slot_lock_is_granted_in_the_order_it_was_asked_for() -> None:
    from fmbseg.engine.slot import _InTurn

    turn, order = _InTurn(), []

    def other() -> None:
        with turn():
            order.append("B")

    with turn():
        order.append("A1")
        waiter = threading.Thread(target=other)
        waiter.start()
        time.sleep(0.1)  # B is waiting now
    with turn():  # asked again at once: a plain Lock would usually let A in before B
        order.append("A2")
    waiter.join()
    assert order == ["A1", "B", "A2"]


def test_slot_run_from_two_threads_processes_one_shard_at_a_time(local_store) -> None:
    """What a threaded Ray actor does with its SLOT_DEPTH shards."""

    class Guarded:
        inside, most = 0, 0
        lock = threading.Lock()

        def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
            with self.lock:
                Guarded.inside += 1
                Guarded.most = max(Guarded.most, Guarded.inside)
            time.sleep(0.05)
            with self.lock:
                Guarded.inside -= 1
            return pa.table({"item": pa.array(spec, pa.int64())}), None

    slot = ShardSlot(local_store, [("sq", "fp")], Guarded)
    specs = _specs(12, 2)
    with ThreadPoolExecutor(SLOT_DEPTH) as pool:
        receipts = [r for (r,) in pool.map(slot.run, range(len(specs)), specs)]
    assert Guarded.most == 1
    assert [r.shard for r in receipts] == list(range(6)) and sum(r.rows for r in receipts) == 12


class SquareAndCube(SquareWorker):
    """Two stages in one pass: squares (with the error rows) and cubes (no errors)."""

    calls: list[int] = []

    def process(self, shard: int, spec: list[int]) -> list[tuple[pa.Table, pa.Table | None]]:
        SquareAndCube.calls.append(shard)
        squares, errors = super().process(shard, spec)
        good = [i for i in spec if i >= 0]
        cubes = pa.table(
            {"item": pa.array(good, pa.int64()), "cube": pa.array([i**3 for i in good], pa.int64())}
        )
        return [(squares.drop_columns(["pid"]), errors), (cubes, None)]


def test_run_stages_commits_each_stage_as_if_it_ran_alone(tmp_path) -> None:
    specs = [[0, 1, -1], [2, 3], [-2], [4, 5, 6], [7]]
    store = ArtifactStore(str(tmp_path / "both"))
    sq, cube = run_stages(
        store, [("sq", "a"), ("cube", "b")], specs, SquareAndCube, LOCAL, meta={"k": 1}
    )
    assert (sq.rows, sq.error_rows, cube.rows, cube.error_rows) == (8, 2, 8, 0)
    assert sq.meta == cube.meta == {"k": 1} and sq.num_shards == cube.num_shards == 5
    assert store.read_table("cube", "b").column("cube").to_pylist() == [i**3 for i in range(8)]

    class SquaresOnly(SquareWorker):
        def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
            records, errors = super().process(shard, spec)
            return records.drop_columns(["pid"]), errors

    alone = run_stage(ArtifactStore(str(tmp_path / "alone")), "sq", "a", specs, SquaresOnly, LOCAL)
    assert _summary(alone) == _summary(sq)  # same files, byte for byte


def test_run_stages_redoes_a_shard_any_stage_lacks_and_refuses_half_committed(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "s"))
    specs = _specs(10, 3)  # 4 shards
    worker = SquareAndCube()
    for shard in (0, 1):  # an earlier, killed run: shards 0 and 1 of sq, only 0 of cube
        (squares, errors), (cubes, _) = worker.process(shard, specs[shard])
        store.write_shard("sq", "a", shard, squares, errors)
        if shard == 0:
            store.write_shard("cube", "b", shard, cubes)
    SquareAndCube.calls = []
    seen: list[tuple[int, int]] = []
    run_stages(
        store,
        [("sq", "a"), ("cube", "b")],
        specs,
        SquareAndCube,
        LOCAL,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert SquareAndCube.calls == [1, 2, 3] and seen[0] == (1, 4) and seen[-1] == (4, 4)
    assert store.read_table("cube", "b").column("item").to_pylist() == list(range(10))

    with pytest.raises(ValueError, match=r"stage 'sq' \(a\) already committed, the others not"):
        run_stages(store, [("sq", "a"), ("cube", "new")], specs, SquareAndCube, LOCAL)
    with pytest.raises(
        StageError,
        match=r"stages 'sq' \(x\), 'cube' \(y\): shard 0 failed: "
        r"TypeError: SquareWorker.process must return a list of 2",
    ):
        run_stages(store, [("sq", "x"), ("cube", "y")], specs, SquareWorker, LOCAL)


# ---- Ray executor ----------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_and_local_give_identical_manifests(ray_session, tmp_path: Path) -> None:
    specs = [[0, 1, -1], [2, 3], [-2], [4, 5, 6], [7]]

    class NoPid(SquareWorker):
        def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
            records, errors = super().process(shard, spec)
            return records.drop_columns(["pid"]), errors

    local = run_stage(ArtifactStore(str(tmp_path / "a")), "sq", "fp", specs, NoPid, LOCAL)
    seen: list[tuple[int, int]] = []
    ray_store = ArtifactStore(str(tmp_path / "b"))
    remote = run_stage(
        ray_store, "sq", "fp", specs, NoPid, RAY, progress=lambda d, t: seen.append((d, t))
    )
    assert _summary(remote) == _summary(local)
    assert (remote.rows, remote.error_rows) == (local.rows, local.error_rows) == (8, 2)
    assert seen[0] == (0, 5) and seen[-1] == (5, 5) and len(seen) == 6
    assert ray_store.read_table("sq", "fp").column("item").to_pylist() == list(range(8))


@pytest.mark.slow
def test_run_stages_on_ray_matches_local(ray_session, tmp_path: Path) -> None:
    specs = _specs(10, 2)
    targets = [("sq", "a"), ("cube", "b")]
    local = run_stages(ArtifactStore(str(tmp_path / "l")), targets, specs, SquareAndCube, LOCAL)
    remote = run_stages(ArtifactStore(str(tmp_path / "r")), targets, specs, SquareAndCube, RAY)
    assert [_summary(m) for m in remote] == [_summary(m) for m in local]


@pytest.mark.slow
def test_ray_replaces_a_dead_actor_and_loses_nothing(ray_session, local_store, tmp_path) -> None:
    specs = _specs(12, 2)  # 6 shards
    factory = functools.partial(SquareWorker, str(tmp_path), 1)
    manifest = run_stage(local_store, "sq", "fp", specs, factory, RAY)
    assert (tmp_path / "died-1").exists()  # the first attempt of shard 1 really died
    items = local_store.read_table("sq", "fp").column("item").to_pylist()
    assert sorted(items) == list(range(12))  # every item exactly once
    assert manifest.num_shards == 6 and manifest.rows == 12


@pytest.mark.slow
def test_ray_gives_up_after_max_retries(ray_session, local_store) -> None:
    runtime = RuntimeConfig(executor="ray", num_workers=1, max_retries=1)
    # the actor holds shards 0 and 1 (SLOT_DEPTH): either may be the one that reports
    with pytest.raises(
        StageError, match=r"shard [01] failed: its worker died on each of 2 attempts"
    ):
        run_stage(local_store, "sq", "fp", _specs(4, 2), AlwaysDies, runtime)
    assert local_store.manifest("sq", "fp") is None


@pytest.mark.slow
def test_ray_task_exception_names_the_shard(ray_session, local_store) -> None:
    one = RuntimeConfig(executor="ray", num_workers=1)
    with pytest.raises(StageError, match=r"shard 2 failed: KeyError: \"missing column 'x'\""):
        run_stage(local_store, "sq", "fp", _specs(), Buggy, one)


@pytest.mark.slow
def test_ray_worker_that_cannot_be_built(ray_session, local_store) -> None:
    one = RuntimeConfig(executor="ray", num_workers=1)
    with pytest.raises(
        StageError,
        match=r"could not be built \(while starting shard [01]\): RuntimeError: weights file not "
        r"found: /nope.pth$",
    ) as failure:
        run_stage(local_store, "sq", "fp", _specs(), _broken_factory, one)
    # the original exception crosses from the actor, so callers can classify it
    assert type(failure.value.cause) is RuntimeError
    assert str(failure.value.cause) == "weights file not found: /nope.pth"


def test_a_stage_error_is_a_user_error_when_its_cause_is() -> None:
    from fmbseg.flows.common import is_user_error
    from fmbseg.models.weights import WeightsNotFoundError

    missing = WeightsNotFoundError("could not find sam_vit_b weights")
    assert is_user_error(StageError("stage 'sam_auto': worker could not be built", missing))
    assert is_user_error(missing)
    assert not is_user_error(StageError("stage 'sam_auto': shard 3 failed", KeyError("x")))
    assert not is_user_error(StageError("no cause"))


@pytest.mark.slow
def test_ray_streams_shards_to_idle_actors(ray_session, local_store, tmp_path) -> None:
    (tmp_path / "markers").mkdir()
    factory = functools.partial(SlowOnShardZero, str(tmp_path / "markers"))
    run_stage(local_store, "sq", "fp", [[i] for i in range(12)], factory, RAY)
    pids = {r["shard"]: r["pid"] for r in local_store.read_table("sq", "fp").to_pylist()}
    other = [s for s, pid in pids.items() if pid != pids[0]]
    # shard 0 could only finish once 9 others had: its actor holds at most 2 more (one
    # before it, one queued behind it), so the other actor took >= 8, more than the 6 a
    # fixed split of 12 over 2 would give it: shards go to whichever actor has room
    assert len(other) >= 8 and len(pids) == 12


class GatedSquare(SquareWorker):
    """Shards wait (up to a minute) for the file ``gate`` to exist."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = Path(gate)

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, pa.Table]:
        deadline = time.monotonic() + 60
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().process(shard, spec)


@pytest.mark.slow
def test_ray_stage_fails_in_one_line_when_no_worker_can_be_placed(ray_session, local_store) -> None:
    runtime = RuntimeConfig(
        executor="ray", num_workers=1, cpus_per_worker=64, placement_timeout_s=2
    )
    started = time.monotonic()
    with pytest.raises(StageError) as failure:
        run_stage(local_store, "sq", "fp", _specs(4, 2), SquareWorker, runtime)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(
        "stage 'sq' (fp): no worker could be placed on the Ray cluster within 2 s "
        "(runtime.placement_timeout_s); each waits for 64 CPU, the cluster has "
    ) and message.endswith(" CPU, 0 GPU free")
    assert time.monotonic() - started < 30
    assert local_store.manifest("sq", "fp") is None


@pytest.mark.slow
def test_ray_drops_a_worker_it_cannot_place_and_finishes_on_the_others(
    ray_session, local_store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # three actors of one CPU on the session's 2 CPUs: one never finds room
    runtime = RuntimeConfig(
        executor="ray", num_workers=3, cpus_per_worker=1.0, placement_timeout_s=5
    )
    gate = tmp_path / "gate"

    def open_gate_once_dropped() -> None:  # the shards wait until the third actor is dropped
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("was not placed" in r.getMessage() for r in list(caplog.records)):
                break
            time.sleep(0.05)
        gate.touch()

    opener = threading.Thread(target=open_gate_once_dropped)
    with caplog.at_level("WARNING", logger="fmbseg.engine.ray_executor"):
        opener.start()
        factory = functools.partial(GatedSquare, str(gate))
        manifest = run_stage(local_store, "sq", "fp", _specs(24, 2), factory, runtime)
        opener.join()
    table = local_store.read_table("sq", "fp")
    assert sorted(table.column("item").to_pylist()) == list(range(24))  # each exactly once
    assert manifest.num_shards == 12
    dropped = [r.getMessage() for r in caplog.records if "was not placed" in r.getMessage()]
    assert dropped == [
        "stage 'sq' (fp): a worker was not placed within 5 s (waits for 1 CPU); dropped, "
        "continuing with 2 (one more is tried every 5 s)"
    ]
    assert len(set(table.column("pid").to_pylist())) == 2
