"""COCO RLE round trips (Fortran order), COCO JSON, PNG label maps, overlays and the gallery."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import (
    MaskRecords,
    RecordError,
    compose_label_map,
    decode_mask,
    encode_mask,
    error_row,
    errors_table,
    mask_row,
)
from fmbseg.tasks.annotate.export import ExportWorker, image_names
from fmbseg.tasks.annotate.export_coco import candidate_annotations, coco_dataset, coco_image
from fmbseg.tasks.annotate.gallery import (
    class_colours,
    has_thumb,
    inner_boundaries,
    label_png,
    overlay,
)
from fmbseg.tasks.annotate.stages import run_declared
from tests.helpers.export_helpers import check_semantic_coco, commit_index, read_png
from tests.helpers.synthetic import make_scene, synthetic_config

# pycocotools' own decode trips a numpy-2 deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---- RLE ------------------------------------------------------------------------------------


def run_export(store, cfg, merge_fp: str, progress=None) -> str:
    """The export stage through the engine, on a committed merge output."""
    return run_declared(store, cfg, "export", {"merge": merge_fp}, progress=progress)["export"]


def test_rle_runs_down_columns_as_coco_requires():
    mask = np.array([[1, 1, 1], [0, 0, 0]], bool)  # one row set: column-major runs alternate
    counts, bbox, area = encode_mask(mask)
    expected = mask_utils.frPyObjects({"size": [2, 3], "counts": [0, 1, 1, 1, 1, 1, 1]}, 2, 3)
    assert counts == expected["counts"]  # a row-major encoder would give [0, 3, 3]
    assert bbox == (0.0, 0.0, 3.0, 1.0) and area == 3


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "strided"])
def test_rle_round_trips_whatever_the_memory_layout(layout):
    rng = np.random.default_rng(0)
    base = rng.random((40, 34)) < 0.3
    mask = {
        "C": np.ascontiguousarray(base),
        "F": np.asfortranarray(base),
        "transposed": np.ascontiguousarray(base.T).T,
        "strided": np.repeat(base, 2, 1)[:, ::2],
    }[layout]
    np.testing.assert_array_equal(mask, base)
    counts, bbox, area = encode_mask(mask)
    assert counts == encode_mask(np.ascontiguousarray(base))[0]
    back = decode_mask(counts, 40, 34)
    assert back.dtype == bool and back.flags.c_contiguous
    np.testing.assert_array_equal(back, base)
    ys, xs = np.nonzero(base)
    assert area == base.sum()
    assert bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_rle_of_empty_and_full_masks():
    for fill in (False, True):
        m = np.full((5, 7), fill)
        counts, _, area = encode_mask(m)
        assert area == m.sum()
        np.testing.assert_array_equal(decode_mask(counts, 5, 7), m)


def _fortran_encode(mask: np.ndarray) -> tuple[bytes, tuple[float, ...], int]:
    """The straightforward encoding encode_mask must equal: numpy's Fortran copy."""
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return rle["counts"], tuple(float(v) for v in mask_utils.toBbox(rle)), int(mask_utils.area(rle))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (33, 17), (64, 48), (0, 5)])
def test_encode_mask_equals_numpys_fortran_copy(shape):
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) < rng.uniform(0, 1) for _ in range(20)]
    masks += [np.zeros(shape, bool), np.ones(shape, bool)]
    assert [encode_mask(m) for m in masks] == [_fortran_encode(m) for m in masks]


def test_encode_mask_takes_views_and_nonzero_values_as_in():
    rng = np.random.default_rng(2)
    base = rng.random((30, 40)) < 0.4
    views = [base[::2, 1::3], base.T, (base * 255).astype(np.uint8), base.astype(np.float32)]
    got = [encode_mask(v) for v in views]
    assert got == [_fortran_encode(np.ascontiguousarray(v != 0)) for v in views]
    assert got[2] == got[3] == _fortran_encode(base)  # 255 and 1.0 are "in", as True is
    with pytest.raises(RecordError, match=r"expected an HxW mask, got shape \(2, 4, 5\)"):
        encode_mask(np.zeros((2, 4, 5), bool))


# ---- COCO ----------------------------------------------------------------------------------


def _records():
    rng = np.random.default_rng(1)
    masks = {
        ("a", 0): rng.random((12, 20)) < 0.4,
        ("a", 2): rng.random((12, 20)) < 0.2,
        ("b", 1): rng.random((9, 7)) < 0.5,
    }
    rows = [
        mask_row(
            m,
            image_id=i,
            image_uri=f"file:///data/{i}.jpg",
            category_id=c,
            category="xyz"[c],
            source="prompt" if c == 0 else "auto",
            score=0.5 + c / 10,
            fingerprint="fp",
        )
        for (i, c), m in masks.items()
    ]
    return MaskRecords.from_rows(rows), masks


def test_candidates_coco_loads_with_pycocotools_and_round_trips_masks(tmp_path):
    records, masks = _records()
    images = [
        coco_image(
            n,
            {
                "image_id": i,
                "file_name": f"{i}.jpg",
                "uri": f"file:///data/{i}.jpg",
                "width": w,
                "height": h,
                "status": "labelled",
            },
            f"labels/{i}.png",
        )
        for n, (i, (h, w)) in enumerate([("a", (12, 20)), ("b", (9, 7))], start=1)
    ]
    anns = candidate_annotations(records.table, {"a": 1, "b": 2}, 1)
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(coco_dataset("candidates", images, anns, ["x", "y", "z"])))
    coco = COCO(str(path))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"], c["label_value"]) for c in cats] == [
        (1, "x", 0),
        (2, "y", 1),
        (3, "z", 2),
    ]
    assert "label-map value + 1" in coco.dataset["info"]["category_ids"]
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == ["a.jpg", "b.jpg"]
    assert coco.imgs[1]["label_file"] == "labels/a.png"
    assert coco.imgs[1]["image_uri"] == "file:///data/a.jpg"
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 3
    for ann in anns:
        img = coco.imgs[ann["image_id"]]
        k = ann["category_id"] - 1  # the vocabulary index
        mask = masks[(img["fmbseg_image_id"], k)]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["iscrowd"] == 0 and ann["area"] == mask.sum()
        assert ann["source"] == ("prompt" if k == 0 else "auto")
        assert ann["score"] == pytest.approx(0.5 + k / 10, abs=1e-6)
        assert (img["height"], img["width"]) == mask.shape


def test_image_names_keep_folders_and_tell_apart_only_what_collides():
    names = image_names(
        ["x/cat.jpg", "x/cat.png", "y/cat.jpg", "d/dog.PNG", "d/a b.jpg", "D/Dog.jpg", "../up.jpg"],
        ["1111111111", "2222222222", "3", "4", "5", "6666666666", "7"],
    )
    # x/cat.jpg and x/cat.png would share labels/x/cat.png; d/dog and D/Dog would share it
    # on a case-insensitive file system; y/cat is alone in its folder
    assert names == [
        "x/cat-11111111",
        "x/cat-22222222",
        "y/cat",
        "d/dog-4",
        "d/a b",
        "D/Dog-66666666",
        "__/up",
    ]


def test_names_at_the_file_system_limit_are_shortened_with_a_hash(tmp_path):
    long = "é" * 120 + ".jpg"  # 244 bytes: a legal file name, too long for "-{id}.png.tmp-..."
    assert len(long.encode()) <= 255
    names = image_names([long, "sub/" + long, "b" * 251 + ".png"], ["a" * 10, "b" * 10, "c"])
    assert len(set(names)) == 3
    for name in names:
        for part in name.split("/"):
            assert len(part.encode()) <= 200
            (tmp_path / f"{part}.png.tmp-0123456789ab").write_bytes(b"")  # fits NAME_MAX
    assert names[0].startswith("é" * 93 + "-")  # whole characters, then the hash
    # different long names stay different: the hash is of the whole name
    assert (
        image_names(["a" * 240 + "x.jpg", "a" * 240 + "y.jpg"], ["1", "2"])[0]
        != (image_names(["a" * 240 + "y.jpg"], ["2"])[0])
    )


# ---- pictures ------------------------------------------------------------------------------


def test_class_colours_are_distinct_and_never_the_ignore_black():
    c = class_colours(200)
    assert c.shape == (200, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c.tolist()}) == 200
    assert not (c == 0).all(axis=1).any()
    # the first 20: Tableau 20, its 10 dark colours then their 10 light ones
    assert c[:2].tolist() == [[31, 119, 180], [255, 127, 14]]
    assert c[9:11].tolist() == [[23, 190, 207], [174, 199, 232]]


def test_label_png_keeps_ids_and_has_a_palette():
    label = np.array([[0, 1, 255], [2, 255, 0]], np.uint8)
    im = Image.open(io.BytesIO(label_png(label, class_colours(3))))
    assert im.mode == "P" and im.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(im), label)
    pal = np.array(im.getpalette()).reshape(-1, 3)
    assert pal[255].tolist() == [0, 0, 0] and pal[1].tolist() == class_colours(3)[1].tolist()


def test_label_png_is_lossless_at_every_compression_level():
    label = make_scene(3, 60, 80).truth.astype(np.uint8)
    sizes = []
    for level in (0, 1, 6, 9):
        data = label_png(label, class_colours(6), level)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), label)
        sizes.append(len(data))
    assert sizes[0] > sizes[1] >= sizes[3]  # level 0 stores, the others deflate


def test_only_an_overlay_larger_than_a_card_gets_a_thumbnail(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    worker = ExportWorker(store, synthetic_config(), "exports/e", 3, frozenset(), "/")
    for name, (h, w) in {"big": (400, 640), "small": (240, 320)}.items():
        image = np.full((h, w, 3), 90, np.uint8)
        worker._write_overlay(name, image, np.zeros((h, w), np.uint8), 0.5)
        over = Image.open(io.BytesIO(store.read_bytes(f"exports/e/overlays/{name}.jpg")))
        assert over.size == (w, h)
    thumb = Image.open(io.BytesIO(store.read_bytes("exports/e/thumbs/big.jpg")))
    assert thumb.size == (320, 200) and has_thumb(400, 640)
    assert not store.exists("exports/e/thumbs/small.jpg") and not has_thumb(240, 320)


def _float_overlay(image, label, colours, alpha):
    """The overlay's formula in float numpy (the reference)."""
    lut = np.zeros((256, 3), np.float64)
    lut[: len(colours)] = colours
    out = np.where((label != 255)[..., None], (1 - alpha) * image + alpha * lut[label], image * 0.6)
    return out


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_overlay_is_the_float_blend_truncated_and_white_on_outlines(alpha):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    label = np.kron(rng.integers(0, 4, (10, 14)), np.ones((5, 5), int)).astype(np.uint8)
    label[label == 3] = 255
    colours = class_colours(3)
    out = overlay(image, label, colours, alpha)
    edges = inner_boundaries(label)
    assert (out[edges] == 255).all() and edges.any()
    expected = _float_overlay(image.astype(np.float64), label, colours, alpha)
    assert np.abs(out[~edges].astype(int) - np.floor(expected[~edges] + 1e-9)).max() == 0
    with pytest.raises(ValueError, match="HxW uint8 label map"):
        overlay(image, label.astype(np.int64), colours, alpha)


def test_overlay_colours_labelled_pixels_and_darkens_the_rest():
    image = np.full((6, 6, 3), 200, np.uint8)
    label = np.full((6, 6), 255, np.uint8)
    label[1:5, 1:5] = 0
    out = overlay(image, label, np.array([[0, 0, 255]], np.uint8), alpha=0.5)
    assert out.shape == image.shape
    assert (out[0, 0] == 120).all()  # unlabelled: 200 * 0.6
    assert out[2, 2].tolist() == [100, 100, 227]  # inside: blended with blue
    assert out[1, 1].tolist() == [255, 255, 255]  # region outline


# ---- the stage -----------------------------------------------------------------------------


def _committed_merge(store: ArtifactStore, tmp_path) -> tuple[str, dict]:
    """An index and a merge output written by hand: two images on disk with their masks,
    one with no confident label, one truncated file the index rejected."""
    rows, images, index = [], {}, []
    for seed, name in enumerate(["first", "second"]):
        scene = make_scene(seed, 24, 40)
        path = tmp_path / f"{name}.png"
        Image.fromarray(scene.image).save(path)
        images[name] = scene
        index.append((f"id-{name}", str(path), 40, 24))
        for k in np.unique(scene.truth):
            rows.append(
                mask_row(
                    scene.truth == k,
                    image_id=f"id-{name}",
                    image_uri=str(path),
                    category_id=int(k),
                    category=f"class{k}",
                    source="prompt" if k % 2 else "auto",
                    score=0.9,
                    fingerprint="fp",
                )
            )
        # an overlapping candidate: a second, larger mask of class 0 over the whole image
        rows.append(
            {
                **rows[-1],
                "category_id": 0,
                "category": "class0",
                "score": 0.1,
                **dict(
                    zip(
                        ("rle_counts", "bbox", "area"),
                        encode_mask(np.ones((24, 40), bool)),
                        strict=True,
                    )
                ),
            }
        )
    Image.fromarray(images["first"].image).save(tmp_path / "plain.png")
    index.append(("id-plain", str(tmp_path / "plain.png"), 40, 24))
    bad = error_row(None, str(tmp_path / "cut.jpg"), "index", "truncated", "cannot decode")
    commit_index(store, "i1", [index], str(tmp_path), [[bad]])
    errors = errors_table(
        [error_row("id-plain", str(tmp_path / "plain.png"), "merge", "no_class_present", "-")]
    )
    store.write_shard("merge", "m1", 0, MaskRecords.from_rows(rows).table, errors)
    store.commit(
        "merge", "m1", 1, meta={"vocabulary": [f"class{k}" for k in range(6)], "index": "i1"}
    )
    return "m1", images


def test_run_export_writes_every_format_and_is_skipped_once_complete(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, scenes = _committed_merge(store, tmp_path)
    cfg = synthetic_config()
    fp = run_export(store, cfg, merge_fp)
    base = f"exports/{fp}"
    for name, scene in scenes.items():
        label = read_png(store, f"{base}/labels/{name}.png")
        # the large low-score candidate is painted first, so the true masks win everywhere
        np.testing.assert_array_equal(label, scene.truth)
        over = Image.open(io.BytesIO(store.read_bytes(f"{base}/overlays/{name}.jpg")))
        assert over.size == (40, 24)
        assert not store.exists(f"{base}/thumbs/{name}.jpg")  # it fits: no second copy
    # an image without a confident label is exported: an all-ignore map, no annotations
    np.testing.assert_array_equal(read_png(store, f"{base}/labels/plain.png"), 255)
    assert read_png(store, f"{base}/labels/plain.png").shape == (24, 40)
    assert not store.exists(f"{base}/overlays/plain.jpg")

    coco = check_semantic_coco(store, base, tmp_path)
    assert [(i["file_name"], i["status"]) for i in coco.dataset["images"]] == [
        ("first.png", "labelled"),
        ("second.png", "labelled"),
        ("plain.png", "no_label"),
    ]
    assert coco.imgs[3]["image_uri"] == str(tmp_path / "plain.png")
    assert len(coco.dataset["categories"]) == 6 and coco.getAnnIds(imgIds=[3]) == []
    semantic = len(coco.dataset["annotations"])
    assert semantic == sum(len(np.unique(s.truth)) for s in scenes.values())

    table = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/records.parquet")))
    candidates = json.loads(store.read_bytes(f"{base}/candidates.json"))
    assert table.num_rows == len(candidates["annotations"]) == semantic + 2  # + the overlaps
    assert candidates["images"] == coco.dataset["images"]
    assert sorted({a["category_id"] for a in candidates["annotations"]}) == sorted(
        {k + 1 for k in table.column("category_id").to_pylist()}
    )
    first_rows = MaskRecords(table).for_image("id-first")
    np.testing.assert_array_equal(compose_label_map(first_rows, 24, 40), scenes["first"].truth)
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet"))).to_pylist()
    assert [(e["uri"], e["stage"], e["error_type"]) for e in errors] == [
        (str(tmp_path / "cut.jpg"), "index", "truncated")
    ]  # no confident label is a result, not an error
    page = store.read_bytes(f"{base}/gallery.html").decode()
    assert '<img loading="lazy" src="overlays/first.jpg"' in page
    assert "class0" in page and "Failed inputs (1)" in page and "cut.jpg" in page
    summary = store.read_json(f"{base}/export.json")
    assert (summary["images"], summary["labelled_images"], summary["no_confident_label"]) == (
        3,
        2,
        1,
    )
    assert summary["failed_images"] == 0 and summary["errors"] == 1
    assert summary["first_errors"][0]["error_type"] == "truncated"
    before = store.read_bytes(f"{base}/export.json")
    assert run_export(store, cfg, merge_fp) == fp
    assert store.read_bytes(f"{base}/export.json") == before  # complete: not redone


def test_ids_come_from_the_vocabulary_recorded_in_the_manifest(tmp_path):
    """A re-export reads merge's recorded vocabulary, whatever order a caller has now; a
    store moved elsewhere exports the same ids and names."""
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, _ = _committed_merge(store, tmp_path)
    fp = run_export(store, synthetic_config(), merge_fp)
    coco = json.loads(store.read_bytes(f"exports/{fp}/annotations.json"))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (k + 1, f"class{k}") for k in range(6)
    ]
    import shutil

    shutil.copytree(tmp_path / "store", tmp_path / "moved")
    moved = ArtifactStore(str(tmp_path / "moved"))
    for rel in ("annotations.json", "export.json"):
        moved.delete(f"exports/{fp}/{rel}")
    assert run_export(moved, synthetic_config(), merge_fp) == fp
    again = moved.read_bytes(f"exports/{fp}/annotations.json")
    assert again == store.read_bytes(f"exports/{fp}/annotations.json")


def test_a_rerun_after_an_interrupted_write_leaves_no_temp_files(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, _ = _committed_merge(store, tmp_path)
    cfg = synthetic_config()
    fp = run_export(store, cfg, merge_fp)
    base = tmp_path / "store" / "exports" / fp
    # what a process killed in its last write leaves: temp files beside their targets
    (base / "export.json").unlink()
    (base / "export.json.tmp-0123456789ab").write_bytes(b'{"half')
    (base / "labels" / "first.png.tmp-abcdef012345").write_bytes(b"\x89PNG")
    assert run_export(store, cfg, merge_fp) == fp
    assert sorted(p.name for p in base.rglob("*.tmp-*")) == []
    assert store.read_json(f"exports/{fp}/export.json")["images"] == 3


def test_the_readme_outputs_section_names_exactly_the_files_written(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## Outputs and the artifact store", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if line.startswith("{store}/exports/{fp}/"):
            paths = re.split(r"\s{2,}", line.removeprefix("{store}/exports/{fp}/"))[0]
            named |= {p.strip().split("/")[0] for p in paths.split(",")}
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, _ = _committed_merge(store, tmp_path)
    fp = run_export(store, synthetic_config(), merge_fp)
    written = set(store.ls(f"exports/{fp}"))
    # thumbs/ holds only overlays larger than a card (none here: the images are 24x40)
    assert written == named - {"thumbs"}, (written, named)
    assert set(store.read_json(f"exports/{fp}/export.json")["files"].values()) - {None} <= {
        n if "." in n else f"{n}/" for n in named
    }


def test_a_gallery_image_gone_since_the_model_stages_costs_only_its_overlay(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, scenes = _committed_merge(store, tmp_path)
    (tmp_path / "second.png").unlink()
    fp = run_export(store, synthetic_config(), merge_fp)  # the export completes
    base = f"exports/{fp}"
    np.testing.assert_array_equal(
        read_png(store, f"{base}/labels/second.png"), scenes["second"].truth
    )
    assert store.exists(f"{base}/overlays/first.jpg")
    assert not store.exists(f"{base}/overlays/second.jpg")
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet"))).to_pylist()
    gone = [e for e in errors if e["stage"] == "export"]
    assert [(e["uri"], e["error_type"]) for e in gone] == [
        (str(tmp_path / "second.png"), "overlay")
    ]
    assert "FileNotFoundError" in gone[0]["message"]
    page = store.read_bytes(f"{base}/gallery.html").decode()
    assert "overlays/second.jpg" not in page and "overlays/first.jpg" in page


def test_an_export_killed_in_its_last_write_leaves_no_temp_file_after_the_rerun(
    tmp_path, monkeypatch
):
    import fmbseg.storage.files as files

    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, _ = _committed_merge(store, tmp_path)
    cfg = synthetic_config()
    replace = files.os.replace

    def killed(src, dst):
        if str(dst).endswith("export.json"):
            raise KeyboardInterrupt  # the process stops between writing and renaming
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_export(store, cfg, merge_fp)
    base = tmp_path / "store" / "exports"
    assert [p.name.split(".tmp-")[0] for p in base.rglob("*.tmp-*")] == ["export.json"]
    monkeypatch.setattr(files.os, "replace", replace)
    fp = run_export(store, cfg, merge_fp)
    assert list(base.rglob("*.tmp-*")) == []
    assert store.read_json(f"exports/{fp}/export.json")["images"] == 3


@pytest.mark.parametrize("order", [None, "area", "prompt_first", "fill_unlabelled"])
def test_export_paints_in_the_order_the_merge_was_made_with(tmp_path, order):
    # A prompt mask with a small automatic mask inside it: only "area" lets the auto win.
    path = tmp_path / "one.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(path)
    big, small = np.zeros((10, 12), bool), np.zeros((10, 12), bool)
    big[0:8, 0:8], small[2:4, 2:4] = True, True
    rows = [
        mask_row(
            m,
            image_id="id",
            image_uri=str(path),
            category_id=c,
            category=f"class{c}",
            source=s,
            score=0.9,
            fingerprint="fp",
        )
        for m, c, s in ((big, 1, "prompt"), (small, 2, "auto"))
    ]
    store = ArtifactStore(str(tmp_path / "store"))
    commit_index(store, "i", [[("id", str(path), 12, 10)]], str(tmp_path), [[]])
    store.write_shard("merge", "m", 0, MaskRecords.from_rows(rows).table, None)
    meta = {"vocabulary": ["class0", "class1", "class2"], "index": "i"}
    store.commit("merge", "m", 1, meta=meta if order is None else {**meta, "order": order})
    fp = run_export(store, synthetic_config(), "m")
    label = np.asarray(Image.open(io.BytesIO(store.read_bytes(f"exports/{fp}/labels/one.png"))))
    assert (label[2:4, 2:4] == (2 if order in (None, "area") else 1)).all()
    assert (label[big & ~small] == 1).all() and (label[~big] == 255).all()
