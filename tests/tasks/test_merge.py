"""merge core, the record container and label-map composition (fmbseg.storage.records)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fmbseg.config import MergeConfig
from fmbseg.storage.records import (
    ERROR_SCHEMA,
    RECORD_SCHEMA,
    MaskRecords,
    RecordError,
    compose_label_map,
    error_row,
    errors_table,
    mask_row,
)
from fmbseg.tasks.merge import merge_shard, sample_auto, sample_count


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _row(mask, cat=0, source="auto", score=0.9, image_id="img", name=None):
    return mask_row(
        mask,
        image_id=image_id,
        image_uri=f"file:///{image_id}.png",
        category_id=cat,
        category=name or f"c{cat}",
        source=source,
        score=score,
        fingerprint="fp",
    )


def _autos(image_id: str, n: int) -> MaskRecords:
    return MaskRecords.from_rows(
        _row(_box(20, 20, 0, i + 1, 0, 1), cat=i % 3, image_id=image_id) for i in range(n)
    )


def _areas(records: MaskRecords) -> list[int]:
    return sorted(records.table.column("area").to_pylist())


# ---- records --------------------------------------------------------------------------------


def test_records_validate_once_and_keep_the_schema():
    recs = MaskRecords.from_rows([_row(_box(4, 6, 1, 3, 2, 5), cat=2, source="prompt")])
    assert recs.table.schema.equals(RECORD_SCHEMA)
    (row,) = recs.rows()
    assert row["bbox"] == [2.0, 1.0, 3.0, 2.0] and row["area"] == 6 and row["source"] == "prompt"
    assert len(MaskRecords.empty()) == 0


def test_records_reject_bad_tables_with_the_reason():
    good = MaskRecords.from_rows([_row(_box(4, 4, 0, 2, 0, 2))]).table
    with pytest.raises(RecordError, match=r"missing \['score'\]"):
        MaskRecords(good.drop_columns(["score"]))
    with pytest.raises(RecordError, match="source must be one of"):
        MaskRecords.from_rows([_row(_box(4, 4, 0, 2, 0, 2), source="manual")])
    bad_type = good.set_column(good.schema.get_field_index("height"), "height", pa.array(["four"]))
    with pytest.raises(RecordError, match="'height' has type string, expected int32"):
        MaskRecords(bad_type)
    with pytest.raises(RecordError, match="category_id must be >= 0"):
        MaskRecords.from_rows([_row(_box(4, 4, 0, 2, 0, 2), cat=-1)])


def test_records_accept_castable_types_and_concat_unifies_sources():
    a = MaskRecords.from_rows([_row(_box(4, 4, 0, 2, 0, 2), source="prompt")])
    b = MaskRecords.from_rows([_row(_box(4, 4, 0, 1, 0, 1), source="auto")])
    loose = a.table.set_column(
        a.table.schema.get_field_index("source"), "source", pa.array(["prompt"])
    )  # plain strings, e.g. from another tool
    assert MaskRecords(loose).table.schema.equals(RECORD_SCHEMA)
    both = MaskRecords.concat([a, b])
    assert both.table.column("source").to_pylist() == ["prompt", "auto"]
    assert both.table.schema.equals(RECORD_SCHEMA)


def test_errors_table_schema():
    t = errors_table([error_row("i", "u", "merge", "no_class_present", "why")])
    assert t.schema.equals(ERROR_SCHEMA) and t.num_rows == 1
    assert errors_table([]).schema.equals(ERROR_SCHEMA)


# ---- label maps -----------------------------------------------------------------------------


def test_label_map_paints_large_first_so_small_masks_stay_visible():
    big = _row(_box(10, 10, 0, 10, 0, 10), cat=1)
    small = _row(_box(10, 10, 2, 4, 2, 4), cat=7)
    for rows in ([big, small], [small, big]):  # row order must not matter
        lab = compose_label_map(rows, 10, 10)
        assert lab.dtype == np.uint8
        assert (lab[2:4, 2:4] == 7).all() and (lab == 1).sum() == 96


def test_label_map_tie_prompt_wins_then_score_then_lower_id():
    a = _box(6, 6, 0, 3, 0, 3)
    auto = _row(a, cat=1, source="auto", score=0.99)
    prompt = _row(a, cat=2, source="prompt", score=0.5)
    for rows in ([auto, prompt], [prompt, auto]):
        assert (compose_label_map(rows, 6, 6)[a] == 2).all()
    hi, lo = _row(a, cat=3, score=0.9), _row(a, cat=4, score=0.8)
    assert (compose_label_map([lo, hi], 6, 6)[a] == 3).all()
    assert (compose_label_map([hi, lo], 6, 6)[a] == 3).all()
    x, y = _row(a, cat=5, score=0.8), _row(a, cat=6, score=0.8)
    assert (compose_label_map([y, x], 6, 6)[a] == 5).all()


def _overlap_scene():
    """A prompt mask P (class 1) with a small auto mask inside it (2), an auto mask (3)
    overlapping P's right edge, and a smaller, less confident auto mask (4) overlapping 3."""
    p = _row(_box(10, 12, 0, 8, 0, 8), cat=1, source="prompt", score=0.9)  # 64 px
    small = _row(_box(10, 12, 2, 4, 2, 4), cat=2, score=0.8)  # 4 px, inside P
    right = _row(_box(10, 12, 0, 6, 6, 12), cat=3, score=0.95)  # 36 px, 12 over P
    low = _row(_box(10, 12, 4, 10, 9, 12), cat=4, score=0.7)  # 18 px, 6 over `right`
    return [p, small, right, low]


def _expected(p_over_auto: bool, auto_overlap: int) -> np.ndarray:
    lab = np.full((10, 12), 255, np.uint8)
    lab[0:6, 6:12] = 3
    lab[4:10, 9:12] = 4
    lab[4:6, 9:12] = auto_overlap
    if p_over_auto:
        lab[0:8, 0:8] = 1
    else:
        lab[0:8, 0:6] = 1
        lab[6:8, 6:8] = 1
        lab[2:4, 2:4] = 2
    return lab


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # smaller wins: the small auto mask (2) and the auto mask 3 overwrite P's pixels
        ("area", _expected(p_over_auto=False, auto_overlap=4)),
        # P over every auto mask; among auto masks the smaller (4) still wins
        ("prompt_first", _expected(p_over_auto=True, auto_overlap=4)),
        # P first; auto masks fill only unlabelled pixels, the most confident (3) first
        ("fill_unlabelled", _expected(p_over_auto=True, auto_overlap=3)),
    ],
)
def test_merge_orders_on_a_constructed_overlap(order, expected):
    rows = _overlap_scene()
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):  # row order must not matter
        lab = compose_label_map([rows[i] for i in perm], 10, 12, order)
        np.testing.assert_array_equal(lab, expected)
    # every order labels the same pixels with only prompt or only auto masks
    if order != "area":
        only_auto = compose_label_map(rows[1:], 10, 12, order)
        assert (only_auto != 255).sum() == (compose_label_map(rows[1:], 10, 12) != 255).sum()


def test_merge_order_is_checked_and_in_the_merge_fingerprint():
    from fmbseg.config import ConfigError, load_config
    from fmbseg.tasks.stage1 import stage1_fingerprints

    with pytest.raises(ValueError, match="order must be one of"):
        compose_label_map(_overlap_scene(), 10, 12, "smallest")
    with pytest.raises(ConfigError, match="'smallest' is not one of"):
        load_config("tiny", ["merge.order=smallest"])
    assert load_config("default").merge.order == "area"
    fps = {
        o: stage1_fingerprints(load_config("tiny", [f"merge.order={o}"]), "idx", ("a",))
        for o in ("area", "prompt_first", "fill_unlabelled")
    }
    assert len({f["merge"] for f in fps.values()}) == 3
    assert len({f["sam_auto"] for f in fps.values()}) == 1  # nothing upstream reruns


def test_label_map_unlabelled_is_255_and_accepts_tables():
    recs = MaskRecords.from_rows([_row(_box(5, 8, 1, 2, 1, 3), cat=0)])
    lab = compose_label_map(recs.table, 5, 8)
    assert (lab == 0).sum() == 2 and (lab == 255).sum() == 38
    assert (compose_label_map([], 5, 8) == 255).all()


def test_label_map_rejects_ids_that_do_not_fit_uint8():
    with pytest.raises(RecordError, match=r"\[0, 254\].*got 255\.\.255"):
        compose_label_map([_row(_box(4, 4, 0, 1, 0, 1), cat=255)], 4, 4)
    with pytest.raises(RecordError, match="a mask is 4x4, the image 5x4"):
        compose_label_map([_row(_box(4, 4, 0, 1, 0, 1))], 5, 4)


# ---- sampling and merging -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "f", "k"),
    [(0, 0.5, 0), (1, 0.5, 1), (3, 0.5, 2), (4, 0.5, 2), (10, 0.25, 3), (7, 1.0, 7), (7, 0.0, 0)],
)
def test_sample_count_rounds_halves_up(n, f, k):
    assert sample_count(n, f) == k


def test_sampling_is_seeded_and_independent_of_order_and_shard():
    cfg = MergeConfig(auto_fraction=0.5, seed=3)
    recs = _autos("img-a", 10)
    first = sample_auto(recs, "img-a", cfg)
    assert len(first) == 5
    shuffled = MaskRecords(recs.table.take(pa.array(np.random.default_rng(1).permutation(10))))
    assert _areas(sample_auto(shuffled, "img-a", cfg)) == _areas(first)  # input order
    # the same image merged in a different shard, next to other images: the same sample
    other = _autos("img-b", 6)
    shard_a, _ = merge_shard(
        [{"image_id": "img-a", "image_uri": "u", "present": [0]}], MaskRecords.empty(), recs, cfg
    )
    shard_b, _ = merge_shard(
        [
            {"image_id": "img-b", "image_uri": "u", "present": [0]},
            {"image_id": "img-a", "image_uri": "u", "present": [0]},
        ],
        MaskRecords.empty(),
        MaskRecords.concat([other, recs]),
        cfg,
    )
    assert _areas(shard_b.for_image("img-a")) == _areas(shard_a) == _areas(first)
    # another seed or another image id: another sample
    samples = {tuple(_areas(sample_auto(recs, "img-a", MergeConfig(0.5, s)))) for s in range(6)}
    assert len(samples) > 1


def test_merge_keeps_all_prompt_masks_and_records_why_images_have_none():
    cfg = MergeConfig(auto_fraction=0.5)
    prompt = MaskRecords.from_rows(
        [_row(_box(8, 8, 0, 2, 0, 2), cat=1, source="prompt", image_id="a")]
    )
    auto = _autos("a", 4)
    images = [
        {"image_id": "a", "image_uri": "ua", "present": [1]},
        {"image_id": "empty", "image_uri": "ue", "present": []},
        {"image_id": "nomask", "image_uri": "un", "present": [2]},
        {"image_id": "broken", "image_uri": "ub", "present": []},
    ]
    upstream = errors_table([error_row("broken", "ub", "clip_dense", "DecodeError", "bad png")])
    records, errors = merge_shard(images, prompt, auto, cfg, upstream)
    assert records.image_ids() == ["a"]
    assert records.table.column("source").to_pylist().count("prompt") == 1
    assert records.table.column("source").to_pylist().count("auto") == 2
    assert errors.schema.equals(ERROR_SCHEMA)
    got = {r["image_id"]: (r["error_type"], r["stage"], r["uri"]) for r in errors.to_pylist()}
    assert got == {
        "empty": ("no_class_present", "merge", "ue"),
        "nomask": ("no_masks", "merge", "un"),
        "broken": ("DecodeError", "merge", "ub"),
    }
    assert "clip_dense: bad png" in errors.to_pylist()[2]["message"]
