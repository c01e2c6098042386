"""Stage `index`: the pure core, cross-shard de-duplication, caching, the store shell."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from fmbseg.config import Config, IndexConfig, RuntimeConfig, replace
from fmbseg.data.sources import list_images, read_bytes
from fmbseg.storage import ArtifactStore, content_hash
from fmbseg.tasks.annotate.index import (
    INDEX,
    RECORD_SCHEMA,
    STAGE,
    count_errors,
    dedup_across_shards,
    index_images,
    index_job,
    plan_index,
    read_index,
    run_index,
)

EXTS = IndexConfig().extensions


def _cfg(shard_size: int = 4, **index: Any) -> Config:
    return replace(
        Config(), runtime=RuntimeConfig(executor="local", shard_size=shard_size), index=index
    )


def _rel(uri: str, root: Path) -> str:
    return os.path.relpath(uri, root)


def test_index_images_core(messy_image_dir: Path, messy_expected: dict[str, Any]) -> None:
    refs = list_images(str(messy_image_dir), EXTS)
    records, errors = index_images(refs, IndexConfig())
    assert records.schema == RECORD_SCHEMA
    assert {_rel(u, messy_image_dir) for u in records["uri"].to_pylist()} == messy_expected["good"]
    got = {
        _rel(u, messy_image_dir): t
        for u, t in zip(errors["uri"].to_pylist(), errors["error_type"].to_pylist(), strict=True)
    }
    assert got == messy_expected["errors"]
    assert set(errors["stage"].to_pylist()) == {"index"}

    by_name = {_rel(r["uri"], messy_image_dir): r for r in records.to_pylist()}
    coffee = by_name["coffee.jpg"]
    assert coffee["image_id"] == content_hash((messy_image_dir / "coffee.jpg").read_bytes())
    assert (by_name["rotated.jpg"]["width"], by_name["rotated.jpg"]["height"]) == (20, 30)
    assert (by_name["deep16.png"]["width"], by_name["deep16.png"]["height"]) == (32, 24)
    dups = errors.filter(pc.equal(errors["error_type"], "duplicate")).to_pylist()
    assert {d["image_id"] for d in dups} == {coffee["image_id"]}
    assert all(d["message"] == f"same bytes as {coffee['uri']}" for d in dups)
    empty = errors.filter(pc.equal(errors["error_type"], "empty")).to_pylist()[0]
    assert empty["image_id"] == content_hash(b"")  # read fine, so it has an identity


def test_reading_in_threads_gives_the_same_tables_and_reads_side_by_side(
    messy_image_dir: Path,
) -> None:
    refs = list_images(str(messy_image_dir), EXTS)
    alone = index_images(refs, IndexConfig())
    together = threading.Barrier(3, timeout=30)  # the first three reads meet: concurrent

    def read(uri: str) -> bytes:
        if uri in {r.uri for r in refs[:3]}:
            together.wait()
        return read_bytes(uri)

    with ThreadPoolExecutor(3) as pool:
        side_by_side = index_images(refs, IndexConfig(), read=read, pool=pool)
    assert side_by_side[0].equals(alone[0]) and side_by_side[1].equals(alone[1])
    assert alone[1].num_rows > 0 and "duplicate" in alone[1]["error_type"].to_pylist()


def test_unreadable_inputs_are_error_rows(tmp_path: Path) -> None:
    def read(uri: str) -> bytes:
        if uri == "gone.jpg":
            raise FileNotFoundError(uri)
        raise ConnectionError("bucket unreachable")

    records, errors = index_images(["gone.jpg", "far.jpg"], IndexConfig(), read=read)
    assert records.num_rows == 0 and records.schema == RECORD_SCHEMA
    assert errors.to_pylist() == [
        {
            "uri": "gone.jpg",
            "image_id": None,
            "stage": "index",
            "error_type": "read_error",
            "message": "file not found",
        },
        {
            "uri": "far.jpg",
            "image_id": None,
            "stage": "index",
            "error_type": "read_error",
            "message": "ConnectionError: bucket unreachable",
        },
    ]


def test_header_only_mode_and_pixel_limit(messy_image_dir: Path) -> None:
    refs = [str(messy_image_dir / n) for n in ("truncated.jpg", "rocket.png")]
    records, errors = index_images(refs, IndexConfig(verify_decode=False))
    assert records.num_rows == 2 and errors.num_rows == 0  # truncation goes unnoticed
    records, errors = index_images(refs, IndexConfig(verify_decode=False, max_pixels=100))
    assert records.num_rows == 0
    assert errors["error_type"].to_pylist() == ["too_large", "too_large"]


def test_run_index_dedups_across_shards(
    local_store: ArtifactStore, messy_image_dir: Path, messy_expected: dict[str, Any]
) -> None:
    cfg = _cfg(shard_size=3)  # 16 files -> 6 shards; the coffee copies land in different shards
    seen: list[tuple[int, int]] = []
    fp = run_index(
        local_store, str(messy_image_dir), cfg, progress=lambda d, t: seen.append((d, t))
    )
    manifest = local_store.require_manifest(STAGE, fp)
    assert manifest.num_shards == 6 and seen[-1] == (6, 6)
    index = read_index(local_store, fp)
    uris = index["uri"].to_pylist()
    assert uris == sorted(uris)
    assert {_rel(u, messy_image_dir) for u in uris} == messy_expected["good"]
    assert len(set(index["image_id"].to_pylist())) == index.num_rows  # each content once
    errors = local_store.read_table(STAGE, fp, kind="errors")
    got = {
        _rel(u, messy_image_dir): t
        for u, t in zip(errors["uri"].to_pylist(), errors["error_type"].to_pylist(), strict=True)
    }
    assert got == messy_expected["errors"]
    assert manifest.rows == 10 and manifest.error_rows == 6
    assert manifest.meta["images"] == 10 and manifest.meta["duplicates"] == 2
    assert manifest.meta["errors_by_type"] == count_errors(local_store, STAGE, fp)
    assert manifest.meta["listed"] == 16
    # rewritten shards leave no stale files behind
    listed = {f for r in manifest.shards for f in r.files()}
    on_disk = {
        n for n in local_store.ls(local_store.stage_rel(STAGE, fp)) if n.endswith(".parquet")
    }
    assert on_disk == listed


def test_dedup_is_idempotent(local_store: ArtifactStore, messy_image_dir: Path) -> None:
    cfg = _cfg(shard_size=3)
    plan = plan_index(str(messy_image_dir), cfg)
    from fmbseg.tasks.annotate.index import IndexWorker

    worker = IndexWorker(cfg.index)
    for shard, spec in enumerate(plan.specs()):
        local_store.write_shard(STAGE, plan.fingerprint, shard, *worker.process(shard, spec))
    held = local_store.shard_receipts(STAGE, plan.fingerprint)
    before = dict(held)
    first = dedup_across_shards(local_store, STAGE, plan.fingerprint, held)
    receipts = local_store.shard_receipts(STAGE, plan.fingerprint)
    assert held == receipts != before  # a rewritten shard's new receipt is put in the dict
    second = dedup_across_shards(local_store, STAGE, plan.fingerprint, held)
    assert first == second and first["duplicates"] == 2
    assert local_store.shard_receipts(STAGE, plan.fingerprint) == receipts  # nothing rewritten
    assert held == receipts


def _snapshot(root: str) -> dict[str, int]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_second_run_is_a_cache_hit_that_writes_nothing(
    local_store: ArtifactStore, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg()
    fp = run_index(local_store, str(image_dir), cfg)
    before = _snapshot(local_store.uri)
    import fmbseg.tasks.annotate.index as index_mod

    def no_reads(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("an image was read on a cache hit")

    monkeypatch.setattr(index_mod, "read_bytes", no_reads)
    assert run_index(local_store, str(image_dir), cfg) == fp
    assert _snapshot(local_store.uri) == before


def test_a_run_hashes_its_listing_once(
    local_store: ArtifactStore, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fmbseg.tasks.annotate.index as index_mod

    hashed: list[int] = []
    real = index_mod.listing_hash

    def counted(refs: Any) -> str:
        hashed.append(len(refs))
        return real(refs)

    monkeypatch.setattr(index_mod, "listing_hash", counted)
    plan = plan_index(str(image_dir), _cfg())
    fp = run_index(local_store, str(image_dir), _cfg())
    assert fp == plan.fingerprint and hashed == [len(plan.refs)] * 2  # one each
    assert index_job(local_store, plan, _cfg()).fp("source") == plan.digest == real(plan.refs)
    assert hashed == [len(plan.refs)] * 2  # the plan's digest, not hashed again


def test_fingerprint_follows_source_and_config(image_dir: Path) -> None:
    base = plan_index(str(image_dir), _cfg()).fingerprint
    assert plan_index(str(image_dir), _cfg()).fingerprint == base
    assert plan_index(str(image_dir), _cfg(shard_size=5)).fingerprint != base
    assert plan_index(str(image_dir), _cfg(max_pixels=10)).fingerprint != base
    (image_dir / "new.png").write_bytes((image_dir / "rocket.png").read_bytes())
    assert plan_index(str(image_dir), _cfg()).fingerprint != base
    os.remove(image_dir / "new.png")
    assert plan_index(str(image_dir), _cfg()).fingerprint == base
    path = image_dir / "coffee.jpg"  # same name, new content: size/mtime change
    path.write_bytes(path.read_bytes() + b"\0")
    assert plan_index(str(image_dir), _cfg()).fingerprint != base


@pytest.mark.s3
def test_run_index_on_s3(s3_store: ArtifactStore, image_dir: Path) -> None:
    fp = run_index(s3_store, str(image_dir), _cfg(shard_size=4))
    index = read_index(s3_store, fp)
    assert index.num_rows == 6
    assert s3_store.latest(STAGE) == fp


def test_read_index_of_all_failed_source(local_store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    fp = run_index(local_store, str(folder), _cfg())
    index = read_index(local_store, fp)
    assert index.num_rows == 0 and index.schema == RECORD_SCHEMA
    assert count_errors(local_store, STAGE, fp) == {"empty": 1}


# ---- Prefect layer (fmbseg.flows.common, fmbseg.flows.index) ---------------------------------


def test_index_task_bodies_without_prefect(local_store: ArtifactStore, image_dir: Path) -> None:
    from fmbseg.flows.common import observe_progress, pass_cache_key, pass_task, record_lineage
    from fmbseg.flows.index import list_images_task

    cfg = _cfg(shard_size=2)
    plan = list_images_task.fn(str(image_dir), cfg, None, None)
    job = index_job(local_store, plan, cfg)
    assert job.fp(STAGE) == plan.fingerprint
    key = pass_cache_key((INDEX,))
    assert key(None, {"job": job}) is None  # not committed
    reports: list[tuple[str, int, int]] = []
    with observe_progress(lambda *a: reports.append(a)):
        assert pass_task((INDEX,)).fn(job) == {STAGE: plan.fingerprint}
    assert reports == [(STAGE, d, 3) for d in range(4)]
    committed = key(None, {"job": job})
    assert committed == key(None, {"job": job})
    assert committed.startswith(f"fmbseg-{STAGE}-") and committed.endswith(plan.fingerprint)
    other = dataclasses.replace(job, store=ArtifactStore(local_store.uri + "-other"))
    assert key(None, {"job": other}) is None  # another store: no hit
    uri = record_lineage(local_store, None, {"stages": {STAGE: plan.fingerprint}})
    assert "/runs/local-" in uri
    run_id = uri.rsplit("/", 1)[-1].removesuffix(".json")
    assert local_store.read_run(run_id)["stages"] == {STAGE: plan.fingerprint}


@pytest.mark.slow
def test_index_flow_under_prefect(prefect_harness, tmp_path: Path, image_dir: Path) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    from fmbseg.flows.index import index_flow

    store_dir = str(tmp_path / "store")
    overrides = ["runtime.executor=local", "runtime.shard_size=2"]
    state = index_flow(str(image_dir), store_dir, "tiny", overrides, return_state=True)
    fp = state.result()
    store = ArtifactStore(store_dir)
    assert read_index(store, fp).num_rows == 6
    flow_run_id = str(state.state_details.flow_run_id)
    lineage = store.read_run(flow_run_id)
    assert lineage["flow"] == "index" and lineage["stages"] == {STAGE: fp}
    assert lineage["config"]["runtime"]["shard_size"] == 2
    api = PREFECT_API_URL.value()
    # GET /artifacts/{key}/latest (this client's filter helpers send fields its server rejects)
    latest = {
        k: httpx.get(f"{api}/artifacts/{k}/latest").json()
        for k in ("index-progress", "index-summary", "index-errors")
    }
    assert {k: a["flow_run_id"] for k, a in latest.items()} == dict.fromkeys(latest, flow_run_id)
    assert latest["index-progress"]["data"] == 100.0
    summary = json.loads(latest["index-summary"]["data"])
    assert summary[0]["rows"] == 6 and summary[0]["fingerprint"] == fp
    assert index_flow(str(image_dir), store_dir, "tiny", overrides) == fp  # cached, same answer
