"""ArtifactStore against a local folder and a loopback S3 server (moto)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from fmbseg.storage import ArtifactStore, NotCommittedError, RetryPolicy, StoreError
from fmbseg.storage import retry as retry_mod
from fmbseg.storage.files import in_order_ahead
from fmbseg.storage.store import is_transient, table_to_parquet_bytes

STAGE = "demo"


def _records(shard: int, n: int = 3, tag: str = "a") -> pa.Table:
    return pa.table(
        {
            "image_id": [f"img-{shard}-{i}" for i in range(n)],
            "value": pa.array([shard * 10 + i for i in range(n)], pa.int32()),
            "writer": [tag] * n,
        }
    )


def _errors(shard: int) -> pa.Table:
    return pa.table({"uri": [f"bad-{shard}.jpg"], "error_type": ["corrupt"]})


def _write_all(store: ArtifactStore, fp: str, shards: int, tag: str = "a") -> None:
    for i in range(shards):
        store.write_shard(STAGE, fp, i, _records(i, tag=tag), _errors(i) if i == 1 else None)


# ---- round trip ------------------------------------------------------------------------------


def test_write_commit_read_back(any_store: ArtifactStore) -> None:
    _write_all(any_store, "fp1", 3)
    manifest, won = any_store.commit(STAGE, "fp1", 3, meta={"note": "x"})
    assert won
    assert (manifest.num_shards, manifest.rows, manifest.error_rows) == (3, 9, 1)
    assert manifest.meta == {"note": "x"}
    assert any_store.is_committed(STAGE, "fp1")
    assert any_store.manifest(STAGE, "fp1") == manifest

    table = any_store.read_table(STAGE, "fp1")
    assert table.column("value").to_pylist() == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    errors = any_store.read_table(STAGE, "fp1", kind="errors")
    assert errors.column("uri").to_pylist() == ["bad-1.jpg"]
    assert any_store.read_shard(STAGE, "fp1", 0, kind="errors").num_rows == 0
    assert any_store.read_table(STAGE, "fp1", columns=["value"]).column_names == ["value"]
    with pytest.raises(StoreError, match="shards 0..2, not 3"):
        any_store.read_shard(STAGE, "fp1", 3)


def test_readers_ignore_uncommitted_stages(any_store: ArtifactStore) -> None:
    _write_all(any_store, "pending", 2)
    assert any_store.manifest(STAGE, "pending") is None
    assert not any_store.is_committed(STAGE, "pending")
    assert any_store.committed_fingerprints(STAGE) == []
    assert any_store.latest(STAGE) is None
    with pytest.raises(NotCommittedError, match="'pending'"):
        any_store.read_table(STAGE, "pending")
    # receipts exist, so a resumed run would skip these shards
    assert sorted(any_store.shard_receipts(STAGE, "pending")) == [0, 1]


def test_commit_refuses_missing_shards(any_store: ArtifactStore) -> None:
    any_store.write_shard(STAGE, "fp", 0, _records(0))
    any_store.write_shard(STAGE, "fp", 2, _records(2))
    with pytest.raises(StoreError, match=r"shards \[1, 3\] have no receipt \(2 of 4 missing\)"):
        any_store.commit(STAGE, "fp", 4)
    assert any_store.manifest(STAGE, "fp") is None


def test_commit_with_the_receipts_in_hand(any_store: ArtifactStore) -> None:
    held = {i: any_store.write_shard(STAGE, "fp", i, _records(i)) for i in range(3)}
    with pytest.raises(StoreError, match=r"shards \[2\] have no receipt \(1 of 3 missing\)"):
        any_store.commit(STAGE, "fp", 3, receipts={i: held[i] for i in (0, 1)})
    manifest, won = any_store.commit(STAGE, "fp", 3, receipts=held)
    assert won and manifest.shards == [held[i] for i in range(3)]
    assert (manifest.rows, manifest.error_rows) == (9, 0)
    assert any_store.read_table(STAGE, "fp").column("value").to_pylist()[:3] == [0, 1, 2]


def test_read_shard_decodes_only_the_columns_asked_for(any_store: ArtifactStore) -> None:
    _write_all(any_store, "fp", 2)
    any_store.commit(STAGE, "fp", 2)
    part = any_store.read_shard(STAGE, "fp", 1, columns=["value"])
    assert part.column_names == ["value"] and part.column("value").to_pylist() == [10, 11, 12]
    assert any_store.read_shard(STAGE, "fp", 1).num_columns > 1


def test_shards_come_in_order_read_a_few_ahead_side_by_side(any_store: ArtifactStore) -> None:
    _write_all(any_store, "fp", 6)
    any_store.commit(STAGE, "fp", 6)
    got = [t.column("value").to_pylist() for t in any_store.shards(STAGE, "fp", columns=["value"])]
    assert got == [[10 * i, 10 * i + 1, 10 * i + 2] for i in range(6)]
    errors = [t.num_rows for t in any_store.shards(STAGE, "fp", "errors")]
    assert errors == [0, 1, 0, 0, 0, 0]

    meet = threading.Barrier(3, timeout=30)  # the first three calls run at once
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        if i < 3:
            meet.wait()
        if i == 4:
            raise ValueError("shard 4 is bad")
        return i * i

    it = in_order_ahead(fn, 100, ahead=3)
    assert [next(it) for _ in range(4)] == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="shard 4 is bad"):
        next(it)
    assert max(started) < 8  # never more than `ahead` beyond what was taken


def test_local_writes_make_again_a_directory_removed_since(local_store: ArtifactStore) -> None:
    def streamed(rel: str) -> None:
        with local_store.open_write(rel) as f:
            f.write(b"w")

    writers = [
        lambda rel: local_store.write_bytes(rel, b"w"),
        lambda rel: local_store.create_exclusive(rel, b"w"),
        streamed,
    ]
    for k, write in enumerate(writers):
        local_store.write_bytes(f"d{k}/sub/first.bin", b"1")  # the store made d{k}/sub
        shutil.rmtree(local_store.path(f"d{k}"))
        write(f"d{k}/sub/second.bin")
        assert local_store.read_bytes(f"d{k}/sub/second.bin") == b"w"
        assert os.listdir(local_store.path(f"d{k}/sub")) == ["second.bin"]  # no temp left


def test_receipt_without_its_file_does_not_count(local_store: ArtifactStore) -> None:
    receipt = local_store.write_shard(STAGE, "fp", 0, _records(0))
    os.remove(local_store.path(local_store.stage_rel(STAGE, "fp"), receipt.part))
    assert local_store.shard_receipts(STAGE, "fp") == {}


def test_latest_and_committed_order(any_store: ArtifactStore) -> None:
    for fp in ("zzz", "aaa"):  # commit order, not name order, decides
        _write_all(any_store, fp, 1)
        any_store.commit(STAGE, fp, 1)
    assert any_store.committed_fingerprints(STAGE) == ["zzz", "aaa"]
    assert any_store.latest(STAGE) == "aaa"
    assert any_store.latest("other") is None


def test_lineage_write_run(any_store: ArtifactStore) -> None:
    uri = any_store.write_run("run-1", {"flow": "index", "stages": {"index": "abc"}})
    assert uri.endswith("runs/run-1.json")
    assert "://" in uri
    run = any_store.read_run("run-1")
    assert run["run_id"] == "run-1"
    assert run["stages"] == {"index": "abc"}
    assert "written_at" in run


def test_tampered_part_is_detected(any_store: ArtifactStore) -> None:
    _write_all(any_store, "fp", 2)
    manifest, _ = any_store.commit(STAGE, "fp", 2)
    rel = f"{any_store.stage_rel(STAGE, 'fp')}/{manifest.shards[1].part}"
    # a valid Parquet file, just not the one the manifest describes
    any_store.write_bytes(rel, table_to_parquet_bytes(_records(1, tag="evil")))
    assert any_store.read_shard(STAGE, "fp", 0).num_rows == 3
    with pytest.raises(StoreError, match="does not match its manifest checksum"):
        any_store.read_table(STAGE, "fp")


def test_sweep_removes_unlisted_parts(local_store: ArtifactStore) -> None:
    first = local_store.write_shard(STAGE, "fp", 0, _records(0, tag="old"))
    second = local_store.write_shard(STAGE, "fp", 0, _records(0, tag="new"))
    assert first.part != second.part
    local_store.commit(STAGE, "fp", 1)
    assert local_store.sweep(STAGE, "fp") == [first.part]
    assert local_store.read_table(STAGE, "fp").column("writer").to_pylist() == ["new"] * 3


def test_exclusive_create_is_complete_or_absent(local_store: ArtifactStore) -> None:
    assert local_store.create_exclusive("x/y.json", b"first")
    assert not local_store.create_exclusive("x/y.json", b"second")
    assert local_store.read_bytes("x/y.json") == b"first"
    assert local_store.ls("x") == ["y.json"]  # no temp files left behind


def test_pickled_store_keeps_absolute_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("rel-store")
    store.write_json("a.json", {"k": 1})
    monkeypatch.chdir("/")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == str(tmp_path / "rel-store")
    assert clone.read_json("a.json") == {"k": 1}


# ---- racing writers --------------------------------------------------------------------------


def test_racing_writers_exactly_one_manifest_wins(any_store: ArtifactStore) -> None:
    n_writers, shards = 4, 3
    barrier = threading.Barrier(n_writers)
    results: dict[str, Any] = {}

    def writer(tag: str) -> None:
        # each writer has its own store object (own fs session), as separate processes would
        store = pickle.loads(pickle.dumps(any_store))
        _write_all(store, "race", shards, tag=tag)
        barrier.wait()
        results[tag] = store.commit(STAGE, "race", shards, meta={"writer": tag})

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [tag for tag, (_, won) in results.items() if won]
    assert len(winners) == 1
    winner_manifest = results[winners[0]][0]
    assert winner_manifest.meta == {"writer": winners[0]}
    assert all(m == winner_manifest for m, _ in results.values())
    assert any_store.manifest(STAGE, "race") == winner_manifest
    table = any_store.read_table(STAGE, "race")  # every listed file matches its checksum
    assert table.num_rows == shards * 3
    for shard in range(shards):
        assert (
            len(set(any_store.read_shard(STAGE, "race", shard).column("writer").to_pylist())) == 1
        )


# ---- a writer killed between shards ----------------------------------------------------------

_KILLED_WRITER = r"""
import json, os, signal, sys
import pyarrow as pa
from fmbseg.config import RuntimeConfig
from fmbseg.storage import ArtifactStore
from fmbseg.engine.runner import run_stage

uri, options, log, kill_at = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])

class Worker:
    def process(self, shard, spec):
        with open(log, "a") as f:
            f.write(f"{shard}\n")
        if shard == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return pa.table({"item": list(spec)}), None

specs = [list(range(i * 2, i * 2 + 2)) for i in range(6)]
run_stage(ArtifactStore(uri, options), "demo", "killed", specs, Worker,
          RuntimeConfig(executor="local"))
"""


class _CountingWorker:
    calls: list[int] = []

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        _CountingWorker.calls.append(shard)
        return pa.table({"item": list(spec)}), None


def test_killed_writer_resumes_only_missing_shards(
    any_store: ArtifactStore, tmp_path: Path
) -> None:
    from fmbseg.config import RuntimeConfig
    from fmbseg.engine.runner import run_stage

    log = tmp_path / "calls.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_WRITER,
            any_store.uri,
            json.dumps(any_store.storage_options),
            str(log),
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert log.read_text().split() == ["0", "1", "2", "3"]  # died inside shard 3
    written = sorted(any_store.shard_receipts(STAGE, "killed"))
    # shard 2 is written while shard 3 is processed: the kill may come before its receipt
    assert written in ([0, 1, 2], [0, 1])
    assert any_store.manifest(STAGE, "killed") is None

    _CountingWorker.calls = []
    specs = [list(range(i * 2, i * 2 + 2)) for i in range(6)]
    manifest = run_stage(
        any_store, STAGE, "killed", specs, _CountingWorker, RuntimeConfig(executor="local")
    )
    assert _CountingWorker.calls == list(range(len(written), 6))  # only the missing ones redone
    assert manifest.num_shards == 6
    assert any_store.read_table(STAGE, "killed").column("item").to_pylist() == list(range(12))


# ---- transient storage errors ----------------------------------------------------------------


class _FlakyFS:
    """Proxy of an fsspec filesystem whose listed methods fail on chosen calls."""

    def __init__(self, fs: Any, methods: set[str], fail: Any) -> None:
        self._fs, self._methods, self._fail = fs, methods, fail
        self.calls = 0
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name not in self._methods:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._fail(self.calls):
                self.failures += 1
                raise ConnectionError(f"injected failure #{self.failures} in {name}")
            return attr(*args, **kwargs)

        return call


_IO_METHODS = {"cat_file", "pipe_file", "makedirs", "ls", "exists", "open", "rm_file"}


def _fast_retry(store: ArtifactStore, attempts: int) -> ArtifactStore:
    return ArtifactStore(
        store.uri, store.storage_options, RetryPolicy(attempts, 0.01, max_delay=0.03)
    )


def test_transient_errors_are_retried_with_backoff(
    any_store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", delays.append)
    store = _fast_retry(any_store, attempts=3)
    flaky = _FlakyFS(store.fs, _IO_METHODS, fail=lambda n: n % 3 == 1)  # 1st, 4th, 7th ...
    store.fs = flaky
    _write_all(store, "flaky", 3)
    manifest, won = store.commit(STAGE, "flaky", 3)
    assert won and manifest.rows == 9
    assert store.read_table(STAGE, "flaky").num_rows == 9
    assert flaky.failures >= 4  # locally only reads and listings go through fsspec
    assert len(delays) == flaky.failures
    assert set(delays) == {0.01}  # every failure succeeded on its first retry


def test_persistent_errors_become_a_store_error(
    any_store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", delays.append)
    store = _fast_retry(any_store, attempts=4)
    store.fs = flaky = _FlakyFS(store.fs, _IO_METHODS, fail=lambda n: True)
    if store.uri.startswith("/"):  # local files are written with os calls, not fsspec

        def no_temp(target: str) -> Any:
            flaky.failures += 1
            raise ConnectionError(f"injected failure #{flaky.failures} in open")

        monkeypatch.setattr(store, "_open_temp", no_temp)
    with pytest.raises(
        StoreError,
        match=r"write stages/demo/fp/part-00000-\w+\.parquet failed "
        r"after 4 attempts on .*ConnectionError: injected failure #4",
    ):
        store.write_shard(STAGE, "fp", 0, _records(0))
    assert delays == [0.01, 0.02, 0.03]  # exponential, capped at max_delay


def test_permanent_errors_are_not_retried(
    any_store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", delays.append)
    with pytest.raises(FileNotFoundError):
        any_store.read_bytes("no/such/file")
    assert delays == []


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError(), True),
        (OSError(errno.EREMOTEIO, "InternalError"), True),
        (type("ReadTimeoutError", (Exception,), {})(), True),
        (type("SlowDown", (Exception,), {})(), True),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (OSError(errno.EINVAL, "InvalidArgument"), False),
        (ValueError(), False),
        (RuntimeError("bug"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient
