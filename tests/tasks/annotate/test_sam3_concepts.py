"""Stage `sam3`'s pure core: SAM 3 concept results -> mask records.

Runs without the sam3 package: a stand-in :class:`ConceptSegmenter` gives known masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fmbseg.config import ConfigError, Sam3Config, load_config
from fmbseg.models.base import ConceptMasks, ConceptSegmenter
from fmbseg.storage.records import MaskRecords, decode_mask
from fmbseg.tasks.annotate.sam3_concepts import (
    concept_job,
    concept_rows,
    present_classes,
    segment_concepts,
)

VOCAB = ["cat", "dog", "car"]
H, W = 6, 8


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _concepts() -> list[ConceptMasks]:
    """cat: present, 3 instances (one empty); dog: absent; car: present, 1 weak instance."""
    return [
        ConceptMasks(
            presence=0.9,
            masks=np.stack([_box(0, 2, 0, 3), _box(3, 6, 4, 8), np.zeros((H, W), bool)]),
            scores=np.array([0.6, 0.8, 0.95], dtype=np.float32),
        ),
        ConceptMasks(
            presence=0.2,
            masks=_box(0, 6, 0, 8)[None],
            scores=np.array([0.19], dtype=np.float32),
        ),
        ConceptMasks(
            presence=0.55,
            masks=_box(1, 2, 1, 2)[None],
            scores=np.array([0.3], dtype=np.float32),
        ),
    ]


class StandIn:
    """A ConceptSegmenter with known answers: name ``n`` of the vocabulary gets the
    ``_concepts()`` entry of the same name; it records what it was asked."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.asked: list[tuple[list[str], float, int | None]] = []

    def set_image(self, image: np.ndarray) -> None:
        self.images.append(image)

    def segment_concepts(
        self, names: Sequence[str], *, min_score: float = 0.0, max_masks: int | None = None
    ) -> list[ConceptMasks]:
        self.asked.append((list(names), min_score, max_masks))
        known = dict(zip(VOCAB, _concepts(), strict=True))
        return [known[n] for n in names]


def test_stand_in_honours_the_interface() -> None:
    assert isinstance(StandIn(), ConceptSegmenter)


def test_rows_keep_present_classes_and_confident_non_empty_masks() -> None:
    cfg = Sam3Config(presence_threshold=0.5, score_threshold=0.5)
    rows = concept_rows(_concepts(), "img1", "file:///a.png", VOCAB, cfg, "fp0")
    # cat: 0.95 is empty -> dropped; 0.8 then 0.6. dog: absent. car: present, score 0.3 < 0.5
    assert [(r["category"], r["score"]) for r in rows] == [
        ("cat", pytest.approx(0.8)),
        ("cat", pytest.approx(0.6)),
    ]
    first = rows[0]
    assert first["source"] == "sam3" and first["category_id"] == 0
    assert (first["image_id"], first["image_uri"], first["fingerprint"]) == (
        "img1",
        "file:///a.png",
        "fp0",
    )
    assert (first["height"], first["width"]) == (H, W)
    assert first["bbox"] == [4.0, 3.0, 4.0, 3.0] and first["area"] == 12  # XYWH of [3:6, 4:8]
    np.testing.assert_array_equal(decode_mask(first["rle_counts"], H, W), _box(3, 6, 4, 8))
    records = MaskRecords.from_rows(rows)  # "sam3" is an allowed source
    assert len(records) == 2 and records.table.column("source").to_pylist() == ["sam3"] * 2


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (Sam3Config(0.0, 0.0), [("cat", 0.8), ("cat", 0.6), ("dog", 0.19), ("car", 0.3)]),
        (Sam3Config(0.5, 0.0), [("cat", 0.8), ("cat", 0.6), ("car", 0.3)]),
        (Sam3Config(0.6, 0.0), [("cat", 0.8), ("cat", 0.6)]),
        (Sam3Config(0.0, 0.0, max_masks_per_class=1), [("cat", 0.8), ("dog", 0.19), ("car", 0.3)]),
        (Sam3Config(0.0, 0.7), [("cat", 0.8)]),
        (Sam3Config(0.95, 0.0), []),
    ],
)
def test_each_threshold_and_the_cap(cfg: Sam3Config, expected: list[tuple[str, float]]) -> None:
    rows = concept_rows(_concepts(), "img1", "u", VOCAB, cfg, "fp")
    assert [(r["category"], round(r["score"], 2)) for r in rows] == expected
    assert present_classes(_concepts(), cfg) == [
        j for j, p in enumerate((0.9, 0.2, 0.55)) if p >= cfg.presence_threshold
    ]


def test_mismatched_inputs_name_the_image() -> None:
    cfg = Sam3Config()
    with pytest.raises(
        ValueError, match=r"concept_rows\('img1'\): 3 concept results for a vocabulary of 2 names"
    ):
        concept_rows(_concepts(), "img1", "u", VOCAB[:2], cfg, "fp")
    bad = _concepts()
    bad[0] = ConceptMasks(0.9, bad[0].masks, np.array([0.9], np.float32))
    with pytest.raises(ValueError, match=r"class 'cat' has masks \(3, 6, 8\) and scores \(1,\)"):
        concept_rows(bad, "img1", "u", VOCAB, cfg, "fp")


def test_job_encodes_the_image_once_and_passes_the_thresholds() -> None:
    seg = StandIn()
    image = np.zeros((H, W, 3), np.uint8)
    cfg = Sam3Config(presence_threshold=0.5, score_threshold=0.5, max_masks_per_class=4)
    job = concept_job(seg, image, "img1", "u", VOCAB, cfg, "fp")
    assert len(seg.images) == 1 and seg.images[0] is image
    assert seg.asked == [(VOCAB, 0.5, 4)]  # the whole vocabulary in one call
    rows = job()
    assert rows == concept_rows(
        segment_concepts(StandIn(), image, VOCAB, cfg), "img1", "u", VOCAB, cfg, "fp"
    )
    assert len(rows) == 2


def test_config_section_loads_and_checks_ranges() -> None:
    assert load_config("default").sam3 == Sam3Config(0.5, 0.5, None)
    assert load_config("tiny", ["sam3.max_masks_per_class=3"]).sam3.max_masks_per_class == 3
    with pytest.raises(ConfigError, match=r"^sam3.presence_threshold: must be <= 1, got 1.5"):
        load_config("default", ["sam3.presence_threshold=1.5"])
    with pytest.raises(ConfigError, match=r"^sam3.max_masks_per_class: must be >= 1, got 0"):
        load_config("default", ["sam3.max_masks_per_class=0"])
    with pytest.raises(ConfigError, match=r"sam3: unknown key 'threshold'"):
        load_config("default", ["sam3.threshold=0.3"])
