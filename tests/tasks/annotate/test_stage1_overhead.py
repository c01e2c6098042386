"""The stage-1 shells' overhead cuts keep results identical: merge's one-take shard merge,
manifests read once per worker, a loader pool shared across shards, the overlay's edges."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
from skimage.segmentation import find_boundaries

from fmbseg.config import MergeConfig
from fmbseg.engine.inorder import InOrder
from fmbseg.storage import ArtifactStore, StoreError
from fmbseg.storage.records import IGNORE, MaskRecords, mask_row
from fmbseg.tasks.annotate.common import ReadAhead, Upstream, loader_pool, post_pool
from fmbseg.tasks.annotate.gallery import inner_boundaries
from fmbseg.tasks.annotate.merge import merge_image, merge_shard


def _records(rng: np.random.Generator, image_ids: list[str], source: str, n: int) -> MaskRecords:
    rows = []
    for _ in range(n):
        mask = np.zeros((12, 10), bool)
        y, x = rng.integers(0, 8, 2)
        mask[y : y + rng.integers(1, 5), x : x + rng.integers(1, 3)] = True
        image_id = image_ids[rng.integers(len(image_ids))]
        rows.append(
            mask_row(
                mask,
                image_id=image_id,
                image_uri=f"u/{image_id}",
                category_id=int(rng.integers(4)),
                category="c",
                source=source,
                score=float(rng.uniform()),
                fingerprint="fp",
            )
        )
    return MaskRecords.from_rows(rows)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_merge_shard_equals_merging_image_by_image(fraction):
    rng = np.random.default_rng(7)
    ids = [f"img-{i}" for i in range(6)]  # img-5 gets no masks at all
    prompt = _records(rng, ids[:3], "prompt", 7)
    auto = _records(rng, ids[1:5], "auto", 30)  # rows of the images interleaved
    cfg = MergeConfig(auto_fraction=fraction, seed=11)
    images = [{"image_id": i, "image_uri": f"u/{i}", "present": [0]} for i in reversed(ids)]

    merged, errors = merge_shard(images, prompt, auto, cfg)

    expected = [merge_image(prompt.for_image(i), auto.for_image(i), i, cfg) for i in reversed(ids)]
    assert merged.table.to_pylist() == MaskRecords.concat(expected).table.to_pylist()
    assert merged.table.schema.equals(MaskRecords.empty().table.schema)
    empty = [i for i, m in zip(reversed(ids), expected, strict=True) if not len(m)]
    assert "img-5" in empty and [r["image_id"] for r in errors.to_pylist()] == empty


def test_upstream_reads_each_manifest_once(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    for shard in range(3):
        store.write_shard("s", "fp", shard, pa.table({"x": [shard, shard]}))
    store.commit("s", "fp", 3)
    reads: list[str] = []
    read_bytes = ArtifactStore.read_bytes
    monkeypatch.setattr(
        ArtifactStore, "read_bytes", lambda self, rel: reads.append(rel) or read_bytes(self, rel)
    )
    up = Upstream(store)
    assert [up.read("s", "fp", i).column("x").to_pylist() for i in range(3)] == [
        [0, 0],
        [1, 1],
        [2, 2],
    ]
    assert up.part("s", "fp", 1, kind="errors") is None  # no errors written: None, no read
    assert sum(r.endswith("_manifest.json") for r in reads) == 1
    assert len(reads) == 4  # the manifest and the three parts


def test_upstream_prefetch_reads_in_the_pool_and_read_takes_the_result(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    for shard in range(3):
        store.write_shard("s", "fp", shard, pa.table({"x": [shard]}))
    store.commit("s", "fp", 3)
    threads: list[str] = []
    read_shard = ArtifactStore.read_shard

    def spy(self, *a, **k):
        threads.append(threading.current_thread().name)
        return read_shard(self, *a, **k)

    monkeypatch.setattr(ArtifactStore, "read_shard", spy)
    pool = loader_pool(2)
    try:
        up = Upstream(store, pool)
        up.prefetch("s", "fp", 1)
        up.prefetch("s", "fp", 1)  # a repeated hint reads once
        assert up.read("s", "fp", 1).column("x").to_pylist() == [1]
        assert len(threads) == 1 and threads[0].startswith("fmbseg-load")
        assert up.read("s", "fp", 1).column("x").to_pylist() == [1]  # taken: read again
        assert len(threads) == 2 and threads[1] == threading.current_thread().name
        up.prefetch("s", "fp", 7)  # a bad shard fails where it is read, not in the hint
        with pytest.raises(StoreError, match="has shards 0..2, not 7"):
            up.read("s", "fp", 7)
    finally:
        pool.shutdown()
    no_pool = Upstream(store)
    no_pool.prefetch("s", "fp", 0)  # no pool: a no-op hint, nothing read
    assert len(threads) == 3
    assert no_pool.read("s", "fp", 0).column("x").to_pylist() == [0] and len(threads) == 4


def test_read_ahead_on_a_shared_pool_keeps_order_errors_and_threads():
    threads: set[threading.Thread] = set()  # the thread objects: a new pool's are new ones

    def load(uri: str) -> np.ndarray:
        threads.add(threading.current_thread())
        if uri == "2":
            raise ValueError("bad 2")
        return np.full(3, int(uri))

    pool = loader_pool(2)
    try:
        reads = ReadAhead(load, pool, ahead=2)
        for _ in range(3):  # shards of one worker reuse the pool's threads
            out = list(reads.each(range(5), str))
            assert [i for i, _, _ in out] == list(range(5))
            assert [int(a[0]) for i, a, _ in out if a is not None] == [0, 1, 3, 4]
            assert str(out[2][2]) == "bad 2" and out[2][1] is None
        # the loads of all three ran on the pool's two threads (other tests' idle loader
        # threads may still be alive, so count the threads that loaded, not all of them)
        assert 1 <= len(threads) <= 2 and all(t.name.startswith("fmbseg-load") for t in threads)
    finally:
        pool.shutdown()
    assert [i for i, _, _ in ReadAhead(load, None).each([1, 3], str)] == [1, 3]  # own pool


def test_read_ahead_start_begins_reads_that_each_then_takes():
    loads: list[tuple[str, str]] = []
    gate = threading.Event()

    def load(uri: str) -> np.ndarray:
        loads.append((uri, threading.current_thread().name))
        gate.wait(5)
        return np.array([len(loads)])

    pool = loader_pool(2)
    try:
        reads = ReadAhead(load, pool, ahead=2)
        reads.start(["a", "b", "c"])  # only the first `ahead` start
        gate.set()
        out = list(reads.each(["a", "b", "c"], str))
        assert [u for u, _, _ in out] == ["a", "b", "c"]
        assert sorted(u for u, _ in loads) == ["a", "b", "c"]  # each read exactly once
        assert all(name.startswith("fmbseg-load") for _, name in loads)
        # started reads are bounded: the oldest hint is dropped, never read twice
        gate.clear()
        reads.start(["d", "e"])
        reads.start(["f", "g"])
        reads.start(["h", "i"])  # 6 > 2 * ahead: "d" and "e" are dropped
        assert list(reads._started) == ["f", "g", "h", "i"]
        gate.set()
        out = list(reads.each(["f", "g", "h", "i"], str))
        assert all(exc is None for _, _, exc in out)
        assert sorted(u for u, _ in loads).count("f") == 1
    finally:
        gate.set()
        pool.shutdown()


def test_upstream_prefetch_then_runs_on_the_table_and_not_on_a_failed_read(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write_shard("s", "fp", 0, pa.table({"uri": ["a", "b"]}))
    store.commit("s", "fp", 1)
    seen: list[list[str]] = []
    done = threading.Event()
    pool = loader_pool(2)
    try:
        up = Upstream(store, pool)
        up.prefetch("s", "fp", 0, then=lambda t: seen.append(t.column("uri").to_pylist()))
        assert up.read("s", "fp", 0).num_rows == 2
        up.prefetch("s", "fp", 5, then=lambda t: seen.append(["never"]))  # no shard 5
        up.prefetch("s", "fp", 0, then=lambda t: 1 / 0)  # a failing hint is swallowed
        up.prefetch("s", "fp", 0, then=lambda t: done.set())
        assert done.wait(5)
        with pytest.raises(StoreError, match="not 5"):
            up.read("s", "fp", 5)
        assert seen == [["a", "b"]]
    finally:
        pool.shutdown()


def test_inner_boundaries_match_skimage():
    rng = np.random.default_rng(3)
    for trial in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        label = rng.choice([0, 1, 4, IGNORE], size=(h, w)).astype(np.uint8)
        if trial % 2:  # blocky regions, as label maps are
            label = np.kron(label, np.ones((3, 3), np.uint8))[:h, :w]
        np.testing.assert_array_equal(
            inner_boundaries(label), find_boundaries(label, mode="inner", background=IGNORE)
        )


@pytest.mark.parametrize("stage", ["clip_dense", "sam_auto", "export"])
def test_a_prefetch_hint_starts_the_next_shards_images_and_each_is_read_once(
    tmp_path, monkeypatch, stage
):
    """The hint for shard 1 reads its upstream table, then starts its first images; the
    shard's processing takes those reads (no image read twice) and its output is unchanged."""
    import fmbseg.tasks.annotate.clip_dense as clip_dense
    import fmbseg.tasks.annotate.common as stage1
    import fmbseg.tasks.annotate.export as export
    from fmbseg.tasks.annotate.sam_pair import SamPairWorker
    from tests.helpers.synthetic import VOCAB, run_pipeline, synthetic_config, write_scenes

    cfg = synthetic_config()
    write_scenes(tmp_path / "images", 8)  # two shards of four
    store = ArtifactStore(str(tmp_path / "store"))
    fps = run_pipeline(store, cfg, tmp_path / "images")
    loads: list[str] = []

    def counting(uri, *a):
        loads.append(uri)
        return load_image(uri, *a)

    load_image = stage1.load_image
    monkeypatch.setattr(stage1, "load_image", counting)  # every worker's images come through it
    if stage == "clip_dense":
        worker = clip_dense.ClipDenseWorker(store, cfg, VOCAB, "fp")
        spec: dict = {"index": fps["index"]}
    elif stage == "sam_auto":
        worker = SamPairWorker(store, cfg, VOCAB, {"sam_auto": "fp"})
        spec = {"clip_dense": fps["clip_dense"]}
    else:
        root = str(tmp_path / "images")
        worker = export.ExportWorker(store, cfg, f"{tmp_path}/again", len(VOCAB), frozenset(), root)
        spec = {"index": fps["index"], "merge": fps["merge"], "gallery": 3}
        decode = export.decode_image  # export decodes its overlays' images at a bounded size

        def counting_decode(data, uri, *a, **k):
            loads.append(uri)
            return decode(data, uri, *a, **k)

        monkeypatch.setattr(export, "decode_image", counting_decode)
    worker.prefetch(1, spec)
    for _ in range(500):  # the hint's reads run in the loader threads
        started = list(worker.images._started)
        if len(started) >= 3 and len(loads) == len(started):
            break
        threading.Event().wait(0.01)
    assert len(started) >= 3 and sorted(loads) == sorted(started)  # before any processing
    result = worker.process(1, spec)
    out, _ = result[0] if isinstance(result, list) else result  # the SAM worker: one per stage
    assert sorted(loads) == sorted(set(loads))  # every image read once
    assert not worker.images._started  # all taken
    if stage != "export":  # export's rows name the files; its files are checked elsewhere
        committed = store.read_shard(stage, fps[stage], 1)
        drop = ["fingerprint"]
        assert out.drop_columns(drop).equals(committed.drop_columns(drop))


def test_in_order_hands_back_in_submission_order_with_failures_in_place():
    """Jobs finishing out of order come back in order; at most ``ahead`` are pending."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    handed: list[tuple[int, object]] = []
    pending_when_handed: list[int] = []

    def done(key, job):
        pending_when_handed.append(len(post._queue))
        try:
            handed.append((key, job.result()))
        except ValueError as exc:
            handed.append((key, str(exc)))

    def job(i):
        def run():
            time.sleep(0.02 * (i % 3 == 0))  # some finish after the ones behind them
            if i == 4:
                raise ValueError("job 4 failed")
            return (i, threading.current_thread().name)

        return run

    pool = ThreadPoolExecutor(3)  # several threads, so jobs do finish out of order
    try:
        post = InOrder(pool, done, ahead=2)
        for i in range(8):
            if i == 6:
                post.failed(i, ValueError("model failed on 6"))
            else:
                post.submit(i, job(i))
            assert len(post._queue) <= 2
        assert [k for k, _ in handed] == list(range(6))  # handed back as the queue filled
        post.drain()
    finally:
        pool.shutdown()
    assert [k for k, _ in handed] == list(range(8))
    assert handed[4][1] == "job 4 failed" and handed[6][1] == "model failed on 6"
    assert all(r[0] == k for k, r in handed if isinstance(r, tuple))
    assert pending_when_handed[:6] == [2] * 6  # the oldest goes once 3 wait, leaving 2
    one = post_pool()
    try:
        assert (
            one.submit(lambda: threading.current_thread().name).result().startswith("fmbseg-post")
        )
    finally:
        one.shutdown()


def test_clip_dense_summarises_in_the_post_thread_and_keeps_the_rows(tmp_path, monkeypatch):
    """One crop per forward pass: each image's rows are built in the post thread while CLIP
    runs on the next one's crops; the shard equals the committed one (larger batches)."""
    import fmbseg.tasks.annotate.clip_dense as clip_dense
    from fmbseg.config import replace
    from tests.helpers.synthetic import VOCAB, run_pipeline, synthetic_config, write_scenes

    cfg = synthetic_config()
    write_scenes(tmp_path / "images", 4)
    store = ArtifactStore(str(tmp_path / "store"))
    fps = run_pipeline(store, cfg, tmp_path / "images")
    threads: list[str] = []
    summarise = clip_dense.summarise

    def recording(*a, **k):
        threads.append(threading.current_thread().name)
        return summarise(*a, **k)

    monkeypatch.setattr(clip_dense, "summarise", recording)
    one_crop = replace(cfg, clip_dense={"batch_size": 1})
    worker = clip_dense.ClipDenseWorker(store, one_crop, VOCAB, "fp")
    out, errors = worker.process(0, {"index": fps["index"]})
    committed = store.read_shard("clip_dense", fps["clip_dense"], 0)
    assert out.drop_columns(["fingerprint"]).equals(committed.drop_columns(["fingerprint"]))
    assert not errors.num_rows and len(threads) == out.num_rows == 4
    assert all(t.startswith("fmbseg-post") for t in threads)
