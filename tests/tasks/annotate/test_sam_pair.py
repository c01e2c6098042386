"""sam_prompt and sam_auto in one pass: the same committed outputs, half the decoding and
half the SAM image-encoder passes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from segment_anything.modeling.image_encoder import ImageEncoderViT

import fmbseg.tasks.annotate.common as stage1
from fmbseg.config import load_config, replace
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.index import run_index
from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared, stage_fingerprint
from tests.helpers.synthetic import VOCAB, write_scenes

CFG = replace(load_config("tiny"), runtime={"executor": "local", "shard_size": 3})


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Counts SAM image-encoder passes and image reads."""
    calls: Counter[str] = Counter()
    forward, load = ImageEncoderViT.forward, stage1.load_image

    def encode(self, x):
        calls["encode"] += len(x)
        return forward(self, x)

    def read(*a):
        calls["read"] += 1
        return load(*a)

    monkeypatch.setattr(ImageEncoderViT, "forward", encode)
    monkeypatch.setattr(stage1, "load_image", read)
    return calls


def _clip(tmp_path: Path, name: str) -> tuple[ArtifactStore, str]:
    if not (tmp_path / "images").exists():  # the same files (and mtimes) for both stores
        write_scenes(tmp_path / "images", 7)
    store = ArtifactStore(str(tmp_path / name))
    index = run_index(store, str(tmp_path / "images"), CFG)
    clip = run_declared(store, CFG, "clip_dense", {"index": index}, vocabulary=VOCAB)
    return store, clip["clip_dense"]


def run_sam(store: ArtifactStore, cfg, clip: str, stages=SAM_PASS, progress=None) -> dict:
    return run_declared(store, cfg, stages, {"clip_dense": clip}, progress=progress)


def _summary(store: ArtifactStore, stage: str, fp: str) -> list[tuple]:
    m = store.require_manifest(stage, fp)
    return [(r.shard, r.rows, r.error_rows, r.sha256, r.errors_sha256) for r in m.shards]


def test_one_pass_writes_what_the_two_stages_write_alone(tmp_path, counted) -> None:
    store, clip = _clip(tmp_path, "apart")
    present = sum(
        bool(p) for p in store.read_table("clip_dense", clip).column("present").to_pylist()
    )
    assert present >= 5  # SAM runs on these
    counted.clear()
    apart = {
        **run_sam(store, CFG, clip, "sam_prompt"),
        **run_sam(store, CFG, clip, "sam_auto"),
    }
    assert counted == {"encode": 2 * present, "read": 2 * present}

    together, clip2 = _clip(tmp_path, "together")
    assert clip2 == clip
    counted.clear()
    seen: dict[str, list] = {"sam_prompt": [], "sam_auto": []}
    progress = {s: (lambda d, t, s=s: seen[s].append((d, t))) for s in seen}
    fps = run_sam(together, CFG, clip, progress=progress)
    assert fps == apart
    assert counted == {"encode": present, "read": present}  # each image read and embedded once
    for stage, fp in fps.items():
        assert _summary(together, stage, fp) == _summary(store, stage, fp)  # byte for byte
        meta, alone = (s.require_manifest(stage, fp).meta for s in (together, store))
        # the same but for the recorded timing: one pass made both stages here
        assert meta["timing"]["outputs"] == fps
        assert alone["timing"]["outputs"] == {stage: fp}
        assert (
            meta["models"]
            == alone["models"]
            == {
                "sam": "sam_tiny",
                "sam_weights": None,
                "sam_precision": CFG.models.sam_precision,
            }
        )
        assert {**meta, "timing": None} == {**alone, "timing": None}
        assert seen[stage][0] == (0, 3) and seen[stage][-1] == (3, 3)

    counted.clear()
    assert run_sam(together, CFG, clip) == fps and not counted  # committed: reused


def test_with_one_stage_committed_only_the_other_runs(tmp_path, counted) -> None:
    store, clip = _clip(tmp_path, "s")
    present = sum(
        bool(p) for p in store.read_table("clip_dense", clip).column("present").to_pylist()
    )
    prompt_fp = run_sam(store, CFG, clip, "sam_prompt")["sam_prompt"]
    changed = replace(CFG, sam_auto={"pred_iou_thresh": 0.5})  # a new sam_auto only
    counted.clear()
    fps = run_sam(store, changed, clip)
    assert fps["sam_prompt"] == prompt_fp and store.is_committed("sam_auto", fps["sam_auto"])
    assert counted == {"encode": present, "read": present}  # sam_auto alone


def test_crop_layers_in_the_pair_share_only_the_whole_image_embedding(tmp_path, counted) -> None:
    # crop_n_layers=1: the paired pass embeds each image once for both stages plus its four
    # crops for sam_auto, and its sam_auto fingerprint is a new one (the crops are in it).
    store, clip = _clip(tmp_path, "s")
    present = sum(
        bool(p) for p in store.read_table("clip_dense", clip).column("present").to_pylist()
    )
    crops = replace(CFG, sam_auto={"crop_n_layers": 1, "crop_n_points_downscale_factor": 2})
    counted.clear()
    fps = run_sam(store, crops, clip)
    assert fps["sam_auto"] != stage_fingerprint("sam_auto", CFG, {"clip_dense": clip})
    assert fps["sam_prompt"] == stage_fingerprint("sam_prompt", CFG, {"clip_dense": clip})
    assert counted == {"encode": 5 * present, "read": present}
    auto = store.read_table("sam_auto", fps["sam_auto"])
    assert auto.num_rows > 0 and set(auto.column("fingerprint").to_pylist()) == {fps["sam_auto"]}


def test_records_built_in_the_post_thread_keep_image_order_and_failures(
    tmp_path, monkeypatch
) -> None:
    """A failure while building one image's auto records (the post thread's part) is that
    image's sam_auto error; its prompt records, and every other image's, stay in order."""
    import threading

    import fmbseg.tasks.annotate.sam_auto as sam_auto
    from fmbseg.tasks.annotate.sam_pair import SamPairWorker

    store, clip = _clip(tmp_path, "store")
    rows = store.read_shard("clip_dense", clip, 0).to_pylist()
    assert len(rows) == 3 and all(r["present"] for r in rows)
    bad = rows[1]["image_id"]
    threads: set[str] = set()
    build = sam_auto.auto_rows  # what auto_job hands the post thread

    def auto_rows(generated, clip_result, *a):
        threads.add(threading.current_thread().name)
        if clip_result.image_id == bad:
            raise RuntimeError("labelling broke")
        return build(generated, clip_result, *a)

    monkeypatch.setattr(sam_auto, "auto_rows", auto_rows)
    vocab = stage1.read_vocabulary(store.require_manifest("clip_dense", clip))
    worker = SamPairWorker(store, CFG, vocab, {"sam_prompt": "p-fp", "sam_auto": "a-fp"})
    (prompt, prompt_errors), (auto, auto_errors) = worker.process(0, {"clip_dense": clip})

    order = [r["image_id"] for r in rows]
    assert threads and all(t.startswith("fmbseg-post") for t in threads)
    prompt_ids = prompt.column("image_id").to_pylist()
    assert sorted(set(prompt_ids), key=order.index) == order  # every image, in image order
    assert prompt_ids == sorted(prompt_ids, key=order.index) and not prompt_errors.num_rows
    auto_ids = auto.column("image_id").to_pylist()
    assert bad not in auto_ids and auto_ids == sorted(auto_ids, key=order.index)
    assert auto_errors.to_pylist()[0]["image_id"] == bad and auto_errors.num_rows == 1
    assert "labelling broke" in auto_errors.to_pylist()[0]["message"]
