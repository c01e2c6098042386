"""Export fans out over merge's shards: names, COCO ids and the gallery stay global, the
driver never loads the whole merge output, and a failed shard resumes alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import (
    MaskRecords,
    error_row,
    errors_table,
    mask_row,
)
from fmbseg.tasks import export as export_mod
from fmbseg.tasks.export import EXPORT_SCHEMA, coco_dataset, image_names, run_export
from fmbseg.tasks.runner import StageError
from tests.synthetic import VOCAB, make_scene, synthetic_config

# shard -> images (folder, stem); shard 1 has no masks at all, only an error row
SHARDS = {0: [("x", "cat"), ("x", "dog")], 1: [], 2: [("y", "cat"), ("y", "emu")]}


def _merge(store: ArtifactStore, tmp_path) -> dict[str, np.ndarray]:
    """A committed 3-shard merge output; returns image id -> its true label map."""
    truths = {}
    for shard, images in SHARDS.items():
        rows = []
        for folder, stem in images:
            seed = len(truths)
            scene = make_scene(seed, 24, 40)
            path = tmp_path / folder / f"{stem}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(scene.image).save(path)
            image_id = f"{seed}{folder}{stem}-0123456789"
            truths[image_id] = scene.truth
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
                )  # fmt: skip
                for k in np.unique(scene.truth)
            ]
        records = MaskRecords.from_rows(rows) if rows else MaskRecords.empty()
        errors = errors_table(
            [error_row(f"gone-{shard}", f"/gone/{shard}.png", "merge", "no_masks", "none")]
        )
        store.write_shard("merge", "m1", shard, records.table, errors)
    store.commit("merge", "m1", len(SHARDS), meta={"vocabulary": list(VOCAB)})
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
    assert rows is not None and rows.num_shards == 3 and rows.rows == 4
    assert [r.rows for r in rows.shards] == [2, 0, 2]
    table = no_whole_merge_reads(store, "export", fp)
    assert table.schema.equals(EXPORT_SCHEMA)
    # stems collide across shards 0 and 2: both cats are disambiguated, globally
    names = table.column("name").to_pylist()
    ids = table.column("image_id").to_pylist()
    assert names == ["cat-0xcat-01", "dog", "cat-2ycat-01", "emu"]
    assert table.column("gallery").to_pylist() == [True, True, True, False]
    for image_id, name in zip(ids, names, strict=True):
        png = Image.open(io.BytesIO(store.read_bytes(f"{base}/labels/{name}.png")))
        np.testing.assert_array_equal(np.asarray(png), truths[image_id])
        assert not store.exists(f"{base}/thumbs/{name}.jpg")  # small: its overlay is its card
        assert store.exists(f"{base}/overlays/{name}.jpg") == (name != "emu")

    # the streamed COCO file is byte-for-byte the one built from all records at once
    merged = MaskRecords(no_whole_merge_reads(store, "merge", "m1"))
    uris = [merged.for_image(i).table.column("image_uri")[0].as_py() for i in ids]
    assert image_names(uris, ids) == names
    whole = coco_dataset(merged, VOCAB, dict(zip(ids, names, strict=True)))
    assert store.read_bytes(f"{base}/annotations.json") == json.dumps(whole).encode()

    records_file = pq.ParquetFile(io.BytesIO(store.read_bytes(f"{base}/records.parquet")))
    assert records_file.read().equals(merged.table)
    assert records_file.metadata.num_row_groups == 1  # not one per merge shard
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet")))
    assert errors.column("image_id").to_pylist() == ["gone-0", "gone-1", "gone-2"]
    page = store.read_bytes(f"{base}/gallery.html").decode()
    cards = [page.index(f'src="overlays/{n}.jpg"') for n in names[:3]]
    assert cards == sorted(cards) and "overlays/emu.jpg" not in page
    assert "showing 3 of 4 labelled images" in page
    assert "Images without masks (3)" in page
    summary = store.read_json(f"{base}/export.json")
    assert (summary["images"], summary["masks"], summary["images_without_masks"]) == (
        4,
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
    fp = export_mod.stage_fingerprint("export", cfg, {"merge": "m1"})
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
    for rel in ("annotations.json", "gallery.html", "labels/cat-2ycat-01.png"):
        assert store.read_bytes(f"exports/{fp}/{rel}") == fresh.read_bytes(f"exports/{fp}/{rel}")


def test_a_failed_file_write_fails_its_shard_before_the_receipt(tmp_path, monkeypatch):
    """Label PNGs and overlays are written in the worker's threads; a write that fails
    fails its shard (no receipt, so a rerun redoes it), with the store's error."""
    store = ArtifactStore(str(tmp_path / "store"))
    _merge(store, tmp_path)
    cfg = synthetic_config(export={"gallery_max_images": 3})
    write_bytes = ArtifactStore.write_bytes

    def failing(self, rel, data):
        if rel.endswith("/overlays/cat-2ycat-01.jpg"):
            raise OSError(f"no space left writing {rel}")
        write_bytes(self, rel, data)

    monkeypatch.setattr(ArtifactStore, "write_bytes", failing)
    with pytest.raises(StageError, match=r"shard 2 failed: OSError: no space left .*cat-2ycat-01"):
        run_export(store, cfg, "m1")
    fp = export_mod.stage_fingerprint("export", cfg, {"merge": "m1"})
    assert sorted(store.shard_receipts("export", fp)) == [0, 1]  # shard 2 is redone on rerun
    monkeypatch.setattr(ArtifactStore, "write_bytes", write_bytes)
    assert run_export(store, cfg, "m1") == fp
    assert store.exists(f"exports/{fp}/overlays/cat-2ycat-01.jpg")


def test_an_empty_merge_exports_valid_empty_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    errors = errors_table([error_row("a", "/a.png", "merge", "no_masks", "-")])
    store.write_shard("merge", "m0", 0, MaskRecords.empty().table, errors)
    store.commit("merge", "m0", 1, meta={"vocabulary": ["a", "b"]})
    fp = run_export(store, synthetic_config(), "m0")
    coco = store.read_bytes(f"exports/{fp}/annotations.json")
    assert coco == json.dumps(coco_dataset(MaskRecords.empty(), ["a", "b"], {})).encode()
    records = pq.read_table(io.BytesIO(store.read_bytes(f"exports/{fp}/records.parquet")))
    assert records.num_rows == 0 and records.schema.names == MaskRecords.empty().table.column_names
    assert store.read_json(f"exports/{fp}/export.json")["images_without_masks"] == 1


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
    fp = export_mod.stage_fingerprint("export", cfg, {"merge": "m1"})
    assert store.is_committed("export", fp) and not store.exists(f"exports/{fp}/export.json")

    def never(*args, **kwargs):
        raise AssertionError("a committed export stage was planned or run again")

    monkeypatch.setattr(export_mod, "write_export_files", write)
    monkeypatch.setattr(export_mod, "plan_export", never)
    monkeypatch.setattr(export_mod.ExportWorker, "__init__", never)
    assert run_export(store, cfg, "m1") == fp
    assert store.read_json(f"exports/{fp}/export.json")["images"] == 4
