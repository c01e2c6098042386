"""Which config keys each stage-1 fingerprint follows (a change reruns what depends on it)."""

from fmbseg.config import load_config
from fmbseg.data.sources import ImageRef, listing_hash
from fmbseg.storage.fingerprint import fingerprint
from fmbseg.tasks.annotate.index import IndexPlan, index_fingerprint, index_job
from fmbseg.tasks.annotate.stages import stage1_fingerprints

VOCAB = ("cat", "dog")


def _fps(*overrides: str) -> dict[str, str]:
    return stage1_fingerprints(load_config("tiny", list(overrides)), "idx", VOCAB)


def test_each_change_reruns_its_stage_and_what_follows_only() -> None:
    base = _fps()
    cases = {
        "models.sam_precision=fp32": {"sam_prompt", "sam_auto", "merge", "export"},
        "sam_auto.pred_iou_thresh=0.5": {"sam_auto", "merge", "export"},
        "sam_auto.crop_n_layers=1": {"sam_auto", "merge", "export"},
        "sam_auto.crop_n_points_downscale_factor=2": {"sam_auto", "merge", "export"},
        "sam_prompt.num_points=3": {"sam_prompt", "merge", "export"},
        "clip_dense.min_crops=2": {"clip_dense", "sam_prompt", "sam_auto", "merge", "export"},
        "export.png_compress_level=1": {"export"},
        # how the work runs, not what it makes: committed outputs are reused
        "sam_auto.points_per_batch=8": set(),
        "clip_dense.batch_size=3": set(),
    }
    for override, changed in cases.items():
        fps = _fps(override)
        assert {s for s in base if fps[s] != base[s]} == changed, override


def test_index_fingerprint_is_the_declared_stage_over_the_listing_hash() -> None:
    cfg = load_config("tiny", ["runtime.shard_size=3", "index.max_pixels=1000"])
    refs = [ImageRef("/a/x.jpg", 10, "1"), ImageRef("/a/y.png", 20), ImageRef("/a/z.gif")]
    source = listing_hash(refs)
    parts = {"index": cfg.index, "shard_size": 3}
    expected = fingerprint("index", "1", parts, {"source": source})
    assert index_fingerprint(cfg, refs) == expected
    job = index_job(None, IndexPlan("/a", expected, tuple(refs), 3), cfg)  # type: ignore[arg-type]
    assert job.fps == {"source": source, "index": expected}
