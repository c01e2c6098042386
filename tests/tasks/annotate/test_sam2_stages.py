"""Both SAM stages with SAM 2.1 as the teacher (``models.sam: sam2.1_tiny``): valid records,
one image-encoder pass per image, and fingerprints that tell the teachers apart."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sam2.modeling.backbones.image_encoder import ImageEncoder

from fmbseg.config import load_config, replace
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.index import run_index
from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared, stage_fingerprint
from tests.helpers.synthetic import VOCAB, write_scenes

TINY = replace(load_config("tiny"), runtime={"executor": "local", "shard_size": 3})
CFG = replace(TINY, models={"sam": "sam2.1_tiny"}, sam_auto={"box_nms_thresh": 0.9})


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts images through SAM 2.1's image encoder."""
    calls: Counter[str] = Counter()
    forward = ImageEncoder.forward

    def encode(self, x):
        calls["encode"] += len(x)
        return forward(self, x)

    monkeypatch.setattr(ImageEncoder, "forward", encode)
    return calls


def test_prompt_and_auto_stages_write_records_with_sam21(tmp_path: Path, encodes) -> None:
    scenes = write_scenes(tmp_path / "images", 5)
    store = ArtifactStore(str(tmp_path / "store"))
    index = run_index(store, str(tmp_path / "images"), CFG)
    clip = run_declared(store, CFG, "clip_dense", {"index": index}, vocabulary=VOCAB)["clip_dense"]
    present = {
        r["image_id"]: r["present"] for r in store.read_table("clip_dense", clip).to_pylist()
    }
    assert sum(map(bool, present.values())) >= 4

    fps = run_declared(store, CFG, SAM_PASS, {"clip_dense": clip})
    assert encodes["encode"] == sum(map(bool, present.values()))  # embedded once per image
    for stage in ("sam_prompt", "sam_auto"):
        # the teacher is in the fingerprint: SAM and SAM 2.1 outputs live side by side
        assert fps[stage] == stage_fingerprint(stage, CFG, {"clip_dense": clip})
        assert fps[stage] != stage_fingerprint(stage, TINY, {"clip_dense": clip})
        assert store.is_committed(stage, fps[stage])

    prompt = store.read_table("sam_prompt", fps["sam_prompt"]).to_pylist()
    auto = store.read_table("sam_auto", fps["sam_auto"]).to_pylist()
    assert prompt and auto
    per_image = Counter(r["image_id"] for r in prompt)
    for image_id, classes in present.items():  # one prompt mask per present class at most
        assert per_image[image_id] <= len(classes)
    for rows, source in ((prompt, "prompt"), (auto, "auto")):
        for r in rows:
            assert r["source"] == source
            assert r["category"] == VOCAB[r["category_id"]]
            assert r["category_id"] in present[r["image_id"]]
            assert 0.0 < r["score"] < 1.0  # SAM 2.1's predicted IoU (a sigmoid)
            scene = scenes[Path(r["image_uri"]).stem]
            rle = {"size": [r["height"], r["width"]], "counts": r["rle_counts"]}
            mask = mask_utils.decode(rle).astype(bool)
            assert mask.shape == scene.image.shape[:2] and mask.any()
            if source == "auto":  # the stage's own filter on SAM 2.1's masks
                assert mask.sum() <= CFG.sam_auto.max_area_fraction * mask.size
    assert {r["fingerprint"] for r in prompt} == {fps["sam_prompt"]}
    assert {r["fingerprint"] for r in auto} == {fps["sam_auto"]}
    assert np.isin([r["image_id"] for r in auto], list(present)).all()
