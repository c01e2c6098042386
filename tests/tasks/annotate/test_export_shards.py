"""Export fans out over the index's and merge's shards: names, COCO ids and the gallery stay
global, the driver never loads the whole merge output, and a failed shard resumes alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import fmbseg.tasks.annotate.export as export_mod
from fmbseg.engine.runner import StageError
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import (
    MaskRecords,
    error_row,
    errors_table,
    mask_row,
)
from fmbseg.tasks.annotate.export import EXPORT_SCHEMA, image_names
from fmbseg.tasks.annotate.export_coco import candidate_annotations, coco_dataset
from fmbseg.tasks.annotate.stages import run_declared, stage_fingerprint
from tests.helpers.export_helpers import check_semantic_coco, commit_index, read_png
from tests.helpers.synthetic import VOCAB, make_scene, synthetic_config

# pycocotools' own decode trips a numpy-2 deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# shard -> images (folder, stem); shard 1 has no masks at all, only an image without them
SHARDS = {0: [("x", "cat"), ("x", "dog")], 1: [], 2: [("y", "cat"), ("y", "emu")]}


def run_export(store, cfg, merge_fp: str, progress=None) -> str:
    """The export stage through the engine, on a committed merge output."""
    return run_declared(store, cfg, "export", {"merge": merge_fp}, progress=progress)["export"]


def _merge(store: ArtifactStore, tmp_path) -> dict[str, np.ndarray]:
    """A committed 3-shard index and merge output; each shard also holds an image without
    masks (``gone/{shard}.png``, 8x6); returns image id -> its true label map."""
    truths = {}
    index = []
    for shard, images in SHARDS.items():
        rows = []
        index.append([])
        for folder, stem in images:
            seed = len(truths)
            scene = make_scene(seed, 24, 40)
            path = tmp_path / folder / f"{stem}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(scene.image).save(path)
            image_id = f"{seed}{folder}{stem}-0123456789"
            truths[image_id] = scene.truth
            index[-1].append((image_id, str(path), 40, 24))
            rows += [
                mask_row(
                    scene.truth == k,
                    image_id=image_id,
                    image_uri=str(path),
                    category_id=int(k),
                    category=VOCAB[k],
                    source="prompt" if k % 2 else "auto",
                    score=0.8,
                    fingerprint="fp",
                )
                for k in np.unique(scene.truth)
            ]
        records = MaskRecords.from_rows(rows) if rows else MaskRecords.empty()
        gone = str(tmp_path / "gone" / f"{shard}.png")
        index[-1].append((f"gone-{shard}", gone, 8, 6))
        errors = errors_table([error_row(f"gone-{shard}", gone, "merge", "no_masks", "none")])
        store.write_shard("merge", "m1", shard, records.table, errors)
    commit_index(store, "i1", index, str(tmp_path))
    store.commit("merge", "m1", len(SHARDS), meta={"vocabulary": list(VOCAB), "index": "i1"})
    return truths


@pytest.fixture
def no_whole_merge_reads(monkeypatch):
    """Fail any read of merge's output as one table (what export must not do)."""
    original = ArtifactStore.read_table

    def guarded(self, stage, *args, **kwargs):
        if stage == "merge":
            raise AssertionError("run_export read the whole merge output at once")
        return original(self, stage, *args, **kwargs)

    monkeypatch.setattr(ArtifactStore, "read_table", guarded)
    return original


def test_export_runs_per_merge_shard_with_global_names_ids_and_gallery(
    tmp_path, no_whole_merge_reads
):
    store = ArtifactStore(str(tmp_path / "store"))
    truths = _merge(store, tmp_path)
    cfg = synthetic_config(export={"gallery_max_images": 3})
    seen = []
    fp = run_export(store, cfg, "m1", progress=lambda done, total: seen.append((done, total)))
    base = f"exports/{fp}"
    assert seen[-1] == (3, 3)  # progress counts merge shards

    rows = store.manifest("export", fp)  # the per-shard rows, committed like any stage
    assert rows is not None and rows.num_shards == 3 and rows.rows == 7
    assert [r.rows for r in rows.shards] == [3, 1, 3]
    table = no_whole_merge_reads(store, "export", fp)
    assert table.schema.equals(EXPORT_SCHEMA)
    # stems collide across shards 0 and 2 only with their folders: x/cat and y/cat differ
    names = table.column("name").to_pylist()
    ids = table.column("image_id").to_pylist()
    assert names == ["x/cat", "x/dog", "gone/0", "gone/1", "y/cat", "y/emu", "gone/2"]
    assert table.column("file_name").to_pylist() == [f"{n}.png" for n in names]
    assert table.column("status").to_pylist() == ["labelled"] * 2 + ["no_label"] * 2 + [
        "labelled"
    ] * 2 + ["no_label"]
    assert table.column("gallery").to_pylist() == [True, True, False, False, True, False, False]
    for image_id, name in zip(ids, names, strict=True):
        png = read_png(store, f"{base}/labels/{name}.png")
        np.testing.assert_array_equal(png, truths.get(image_id, np.full((6, 8), 255)))
        assert not store.exists(f"{base}/thumbs/{name}.jpg")  # small: its overlay is its card
        assert store.exists(f"{base}/overlays/{name}.jpg") == (name in names[:2] + names[4:5])

    coco = check_semantic_coco(store, base, tmp_path)
    assert [i["id"] for i in coco.dataset["images"]] == list(range(1, 8))
    assert [i["fmbseg_image_id"] for i in coco.dataset["images"]] == ids
    # the streamed candidates file is byte-for-byte the one built from all records at once
    merged = MaskRecords(no_whole_merge_reads(store, "merge", "m1"))
    coco_ids = {image_id: n for n, image_id in enumerate(ids, start=1)}
    whole = coco_dataset(
        "candidates",
        coco.dataset["images"],
        candidate_annotations(merged.table, coco_ids, 1),
        VOCAB,
    )
    assert store.read_bytes(f"{base}/candidates.json") == json.dumps(whole).encode()
    uris = table.column("uri").to_pylist()
    assert image_names([u[len(str(tmp_path)) + 1 :] for u in uris], ids) == names

    records_file = pq.ParquetFile(io.BytesIO(store.read_bytes(f"{base}/records.parquet")))
    assert records_file.read().equals(merged.table)
    assert records_file.metadata.num_row_groups == 1  # not one per merge shard
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet")))
    assert errors.num_rows == 0  # images without masks are results, not failures
    page = store.read_bytes(f"{base}/gallery.html").decode()
    cards = [page.index(f'src="overlays/{n}.jpg"') for n in ("x/cat", "x/dog", "y/cat")]
    assert cards == sorted(cards) and "overlays/y/emu.jpg" not in page
    assert "showing 3 of 4 labelled images" in page
    assert "Failed inputs" not in page
    summary = store.read_json(f"{base}/export.json")
    assert (summary["images"], summary["masks"], summary["no_confident_label"]) == (
        7,
        len(merged),
        3,
    )
    assert summary["prompt_masks"] + summary["auto_masks"] == len(merged)


def test_a_failed_export_shard_resumes_without_redoing_committed_ones(
    tmp_path, monkeypatch, no_whole_merge_reads
):
    store = ArtifactStore(str(tmp_path / "store"))
    _merge(store, tmp_path)
    cfg = synthetic_config(export={"gallery_max_images": 3})
    process = export_mod.ExportWorker.process
    done: list[int] = []

    def flaky(self, shard, spec):
        if shard == 2 and not done.count(-1):
            done.append(-1)
            raise OSError("disk full")
        done.append(shard)
        return process(self, shard, spec)

    monkeypatch.setattr(export_mod.ExportWorker, "process", flaky)
    with pytest.raises(StageError, match="shard 2 failed: OSError: disk full"):
        run_export(store, cfg, "m1")
    fp = stage_fingerprint("export", cfg, {"merge": "m1"})
    assert not store.exists(f"exports/{fp}/export.json")  # not complete
    assert not store.exists(f"exports/{fp}/annotations.json")
    assert sorted(store.shard_receipts("export", fp)) == [0, 1]

    done.clear()
    done.append(-1)  # no more failures
    assert run_export(store, cfg, "m1") == fp
    assert done == [-1, 2]  # only the shard without a receipt was redone

    fresh = ArtifactStore(str(tmp_path / "fresh"))
    _merge(fresh, tmp_path)
    monkeypatch.setattr(export_mod.ExportWorker, "process", process)
    assert run_export(fresh, cfg, "m1") == fp
    for rel in ("annotations.json", "gallery.html", "labels/y/cat.png"):
        assert store.read_bytes(f"exports/{fp}/{rel}") == fresh.read_bytes(f"exports/{fp}/{rel}")


def test_a_failed_file_write_fails_its_shard_before_the_receipt(tmp_path, monkeypatch):
    """Label PNGs and overlays are written in the worker's threads; a write that fails
    fails its shard (no receipt, so a rerun redoes it), with the store's error."""
    store = ArtifactStore(str(tmp_path / "store"))
    _merge(store, tmp_path)
    cfg = synthetic_config(export={"gallery_max_images": 3})
    write_bytes = ArtifactStore.write_bytes

    def failing(self, rel, data):
        if rel.endswith("/overlays/y/cat.jpg"):
            raise OSError(f"no space left writing {rel}")
        write_bytes(self, rel, data)

    monkeypatch.setattr(ArtifactStore, "write_bytes", failing)
    with pytest.raises(StageError, match=r"shard 2 failed: OSError: no space left .*y/cat.jpg"):
        run_export(store, cfg, "m1")
    fp = stage_fingerprint("export", cfg, {"merge": "m1"})
    assert sorted(store.shard_receipts("export", fp)) == [0, 1]  # shard 2 is redone on rerun
    monkeypatch.setattr(ArtifactStore, "write_bytes", write_bytes)
    assert run_export(store, cfg, "m1") == fp
    assert store.exists(f"exports/{fp}/overlays/y/cat.jpg")


def test_an_empty_merge_exports_every_image_with_an_all_ignore_map(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    commit_index(store, "i0", [[("a", str(tmp_path / "a.png"), 5, 3)]], str(tmp_path))
    errors = errors_table([error_row("a", str(tmp_path / "a.png"), "merge", "no_masks", "-")])
    store.write_shard("merge", "m0", 0, MaskRecords.empty().table, errors)
    store.commit("merge", "m0", 1, meta={"vocabulary": ["a", "b"], "index": "i0"})
    fp = run_export(store, synthetic_config(), "m0")
    coco = check_semantic_coco(store, f"exports/{fp}", tmp_path)
    assert [i["file_name"] for i in coco.dataset["images"]] == ["a.png"]
    assert coco.dataset["annotations"] == []
    records = pq.read_table(io.BytesIO(store.read_bytes(f"exports/{fp}/records.parquet")))
    assert records.num_rows == 0 and records.schema.names == MaskRecords.empty().table.column_names
    assert store.read_json(f"exports/{fp}/export.json")["no_confident_label"] == 1


def test_open_write_publishes_the_file_only_when_the_block_succeeds(any_store):
    store = any_store
    with store.open_write("a/b.bin") as f:
        f.write(b"one ")
        f.write(b"two")
    assert store.read_bytes("a/b.bin") == b"one two"
    with pytest.raises(RuntimeError), store.open_write("a/c.bin") as f:
        f.write(b"partial")
        raise RuntimeError("stop")
    assert not store.exists("a/c.bin")
    assert store.ls("a") == ["b.bin"]  # no temp file left behind either


def test_an_export_killed_while_writing_files_redoes_only_the_files(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    _merge(store, tmp_path)
    cfg = synthetic_config()
    write = export_mod.write_export_files

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "write_export_files", killed)
    with pytest.raises(KeyboardInterrupt):
        run_export(store, cfg, "m1")
    fp = stage_fingerprint("export", cfg, {"merge": "m1"})
    assert store.is_committed("export", fp) and not store.exists(f"exports/{fp}/export.json")

    def never(*args, **kwargs):
        raise AssertionError("a committed export stage was planned or run again")

    monkeypatch.setattr(export_mod, "write_export_files", write)
    monkeypatch.setattr(export_mod, "plan_export", never)
    monkeypatch.setattr(export_mod.ExportWorker, "__init__", never)
    assert run_export(store, cfg, "m1") == fp
    assert store.read_json(f"exports/{fp}/export.json")["images"] == 7


def test_an_index_shard_of_only_failed_files_exports_its_errors(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    bad = error_row(None, str(tmp_path / "b.jpg"), "index", "not_an_image", "text")
    rows = [[("a", str(tmp_path / "a.png"), 5, 3)], []]
    commit_index(store, "i2", rows, str(tmp_path), [[], [bad]])
    no_mask = error_row("a", str(tmp_path / "a.png"), "merge", "no_class_present", "-")
    store.write_shard("merge", "m2", 0, MaskRecords.empty().table, errors_table([no_mask]))
    store.write_shard("merge", "m2", 1, MaskRecords.empty().table, errors_table([]))
    store.commit("merge", "m2", 2, meta={"vocabulary": ["a"], "index": "i2"})
    fp = run_export(store, synthetic_config(), "m2")
    coco = check_semantic_coco(store, f"exports/{fp}", tmp_path)
    assert [i["status"] for i in coco.dataset["images"]] == ["no_label"]
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"exports/{fp}/errors.parquet")))
    assert errors.column("error_type").to_pylist() == ["not_an_image"]
