"""Stage-1 annotation throughput (images/s) end to end, and the share of time outside models.

Runs index -> clip_dense -> sam_prompt + sam_auto (one pass, as the flow runs them) -> merge
-> export with the local executor on ``--images`` generated photos (random crops of
skimage's sample photos) and the models a config names (``tiny`` = random-weight tiny CLIP
and SAM, CPU). Every model call (CLIP ``crops_and_dense``/``encode_text``, SAM
``set_image``/``predict``/``predict_batch``/``generate``) is timed, so the report separates
model time from everything else (decoding, resizing, stitching, RLE, Parquet, PNG, store
I/O), per stage and overall, measured in this one run.

The tiny models take a few ms per image, so the fixed per-image work (three decodes, a PNG,
an overlay JPEG, Parquet shards of 4 images) weighs heavily next to them. For the share
next to real architectures, random weights are enough: ``--config quickstart --set
models.clip_weights=null --set models.sam_weights=null --set runtime.device=cpu``
(CLIP ViT-B/16, SAM ViT-B; tens of seconds per image on a CPU, so use few ``--images``).

A second table splits the time outside model calls by phase, from timers on the functions
that do that work (main thread only; an inner timed call counts toward the outermost):
decoding images, RLE encode/decode, Parquet (de)serialisation, store file operations, PNG/JPEG
and overlays; "other" is the rest (Python glue, resizing, stitching, sampling, validation).
Decoding done ahead in the loader threads overlaps the models and is shown apart.

``--forward-time`` also times every outermost ``torch.nn.Module`` forward (global hooks; they
add a little to the model time), to show how much of a model call is the network itself and
how much the model library's own pre/post-processing (e.g. segment-anything's automatic mask
generator: point grids, its RLE, NMS, copying).

``--store URI`` puts the artifact store elsewhere, e.g. on S3 (``--storage-option
client_kwargs.endpoint_url=http://127.0.0.1:5000`` for MinIO or moto; the bucket must exist;
each run writes under ``URI/run-{r}``), to see what the store's requests add; the images
stay on local disk.

    python bench/annotate.py [--config tiny] [--images 64] [--repeat 3] [--threads 1] [--forward-time]
                             [--set k=v ...] [--profile FILE] [--store URI --storage-option k=v ...]
"""

from __future__ import annotations

import collections
import cProfile
import functools
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import ModelBuilds, device_sync, parser, timed

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TIMED = {"crops_and_dense", "encode_text", "set_image", "predict", "predict_batch", "generate"}
MODEL_TIME: collections.Counter[str] = collections.Counter()
PHASE_TIME: collections.Counter[str] = collections.Counter()  # main thread, outermost call
THREAD_TIME: collections.Counter[str] = collections.Counter()  # loader threads (overlapped)
FORWARD_TIME: collections.Counter[str] = collections.Counter()
_depth = threading.local()


class Timed:
    """Proxy of a model that adds the wall time of its model calls to MODEL_TIME."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in TIMED or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                device_sync()
                MODEL_TIME[name] += time.perf_counter() - start

        return timed


def time_phase(phase: str, fn: Any) -> Any:
    """``fn`` wrapped to add its wall time to PHASE_TIME[phase] (THREAD_TIME off the main thread).

    Only the outermost timed call of a thread counts, so phases never overlap.
    """

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if getattr(_depth, "n", 0):
            return fn(*args, **kwargs)
        _depth.n = 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n = 0
            main = threading.current_thread() is threading.main_thread()
            (PHASE_TIME if main else THREAD_TIME)[phase] += time.perf_counter() - start

    return timed


def patch_phases() -> list[str]:
    """Time the functions doing the non-model work, where the stages look them up."""
    import pyarrow.parquet as pq

    import fmbseg.tasks.annotate.common as stage1
    import fmbseg.tasks.annotate.export as export
    from fmbseg.storage import records, store

    targets = {
        "decode": [(stage1, "load_image")],
        "rle": [(records, "encode_mask"), (records, "decode_mask")],
        "parquet": [
            (store, "table_to_parquet_bytes"),
            (pq, "read_table"),
            (pq.ParquetFile, "read"),
        ],
        "store io": [
            (store.ArtifactStore, m)
            for m in ("read_bytes", "write_bytes", "ls", "exists", "create_exclusive", "delete")
        ],
        "png/jpeg": [(export, "label_png"), (export, "jpeg"), (export, "overlay")],
    }
    for phase, places in targets.items():
        for owner, name in places:
            setattr(owner, name, time_phase(phase, getattr(owner, name)))
    return list(targets)


def hook_forwards() -> None:
    """Add the wall time of every outermost nn.Module forward to FORWARD_TIME["forward"]."""
    state = {"depth": 0, "start": 0.0}

    def pre(module: Any, args: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            if state["depth"] == 0:
                state["start"] = time.perf_counter()
            state["depth"] += 1

    def post(module: Any, args: Any, out: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            state["depth"] -= 1
            if state["depth"] == 0:
                FORWARD_TIME["forward"] += time.perf_counter() - state["start"]

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)


def make_images(folder: Path, n: int, size: tuple[int, int] = (96, 128)) -> None:
    import skimage.data
    from PIL import Image

    photos = [
        np.asarray(getattr(skimage.data, p)())[..., :3]
        for p in ("astronaut", "chelsea", "coffee", "rocket")
    ]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(1.5, 3.0)
        h, w = int(size[0] * scale), int(size[1] * scale)
        h, w = min(h, photo.shape[0]), min(w, photo.shape[1])
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        im = Image.fromarray(photo[y : y + h, x : x + w]).resize(
            size[::-1], Image.Resampling.BILINEAR
        )
        im.save(folder / f"img-{i:04d}.jpg", quality=92)


def pipeline(
    store: Any,
    cfg: Any,
    images: str,
    vocab: Any,
    profiler: cProfile.Profile | None,
    builds: ModelBuilds,
) -> tuple[list[tuple[str, float, float, float]], dict[str, Any], int]:
    """Run every stage once on a fresh store: (per-stage wall/model/build s, phases, masks)."""
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared

    rows: list[tuple[str, float, float, float]] = []
    fps: dict[str, Any] = {}
    by_phase: dict[str, Any] = {}

    def stage(name: str, fn: Any, *a: Any) -> None:
        for counter in (MODEL_TIME, PHASE_TIME, THREAD_TIME, FORWARD_TIME):
            counter.clear()
        builds.seconds = 0.0
        if profiler is not None:
            profiler.enable()
        run = timed(functools.partial(fn, store, cfg, *a))
        if profiler is not None:
            profiler.disable()
        fps[name] = run.result
        rows.append((name, run.seconds, sum(MODEL_TIME.values()), builds.seconds))
        by_phase[name] = (dict(PHASE_TIME), dict(THREAD_TIME), FORWARD_TIME["forward"])

    stage("index", lambda s, c: run_index(s, images, c))

    def declared(names: Any) -> Any:  # the stage(s) through the engine, on the fps so far
        return lambda s, c: run_declared(s, c, names, dict(fps), vocabulary=vocab)

    for name, names in [
        ("clip_dense", "clip_dense"),
        ("sam", SAM_PASS),
        ("merge", "merge"),
        ("export", "export"),
    ]:
        stage(name, declared(names))  # "sam": both SAM stages, one pass
        fps.update(fps.pop(name))
    return rows, by_phase, store.require_manifest("merge", fps["merge"]).rows


def _share(wall: float, model: float, build: float) -> float:
    """Share of the time outside model calls, model builds excluded."""
    return (wall - model - build) / (wall - build) if wall > build else 0.0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs on fresh stores; the median one is reported"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--forward-time",
        action="store_true",
        help="also time nn.Module forwards inside the model calls",
    )
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="write cProfile stats of the stage calls (not imports) to FILE",
    )
    ap.add_argument("--store", metavar="URI", help="artifact store root (default: a temp dir)")
    ap.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option of --store, dotted keys nest",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fmbseg.cli.core import parse_storage_options
    from fmbseg.config import load_config, replace
    from fmbseg.data.vocab import load_vocabulary
    from fmbseg.models import registry
    from fmbseg.storage import ArtifactStore

    builds = ModelBuilds(wrap=Timed)
    registry.list_models()  # import the model libraries now, not inside the first stage
    phases = patch_phases()
    if args.forward_time:
        hook_forwards()
    cfg = replace(load_config(args.config, args.set), runtime={"executor": "local"})
    vocab = load_vocabulary("voc-20")
    profiler = cProfile.Profile() if args.profile else None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", args.images)
        for r in range(args.repeat):
            root = f"{args.store.rstrip('/')}/run-{r}" if args.store else f"{tmp}/store-{r}"
            store = ArtifactStore(root, parse_storage_options(args.storage_option))
            runs.append(pipeline(store, cfg, f"{tmp}/images", vocab, profiler, builds))
    # the run with the median outside share (all its figures from that one run)
    shares = [_share(*np.sum([row[1:] for row in rows], axis=0)) for rows, _, _ in runs]
    order = np.argsort(shares)
    rows, by_phase, masks = runs[order[len(order) // 2]]
    if profiler is not None:
        profiler.dump_stats(args.profile)

    print(
        f"config {args.config}: {args.images} images, {len(vocab)} classes, {masks} merged "
        f"masks, torch threads {args.threads}, store {args.store or 'local temp dir'}"
    )
    print("outside = wall - model calls - model builds (decode, resize, stitch, RLE, I/O, ...)")
    print(
        f"{'stage':<11} {'wall s':>8} {'build s':>8} {'model s':>8} {'outside':>8} {'images/s':>9}"
    )
    for name, wall, m, b in [*rows, ("total", *np.sum([r[1:] for r in rows], axis=0))]:
        print(
            f"{name:<11} {wall:8.2f} {b:8.2f} {m:8.2f} {_share(wall, m, b):8.0%} "
            f"{args.images / (wall - b):9.1f}"
        )
    print("images/s and the outside share exclude model builds (paid once per worker).")
    no_model = [r for r in rows if r[2] == 0.0]  # stages that call no model
    if no_model:
        names = ", ".join(r[0] for r in no_model)
        floor = sum(r[1] - r[3] for r in no_model) / sum(r[1] - r[3] for r in rows)
        print(
            f"stages without model calls ({names}) alone: {floor:.0%} of the time, a floor "
            "under the outside share that hiding work behind model calls cannot lower"
        )
    if args.repeat > 1:
        print(
            f"the median of {args.repeat} runs by outside share; all runs: "
            + ", ".join(f"{x:.0%}" for x in sorted(shares))
        )
    print()
    print("time outside model calls by phase, s (main thread; 'other' = the rest)")
    cols = [*phases, "other"]
    print(
        f"{'stage':<11} "
        + " ".join(f"{c:>9}" for c in cols)
        + f" {'threads':>8}"
        + (f" {'nn fwd':>8}" if args.forward_time else "")
    )
    totals = np.zeros(len(cols) + 2)
    for name, wall, m, b in rows:
        main, threads, fwd = by_phase[name]
        vals = [main.get(c, 0.0) for c in phases]
        vals += [wall - m - b - sum(vals), sum(threads.values()), fwd]
        totals += vals
        print(_phase_line(name, vals, args.forward_time))
    print(_phase_line("total", list(totals), args.forward_time))
    print("threads = decoding in the loader threads, overlapped with the model calls.")
    if args.forward_time:
        print("nn fwd = time inside torch.nn.Module forwards (part of 'model s').")


def _phase_line(name: str, vals: list[float], forward: bool) -> str:
    line = f"{name:<11} " + " ".join(f"{v:9.3f}" for v in vals[:-2]) + f" {vals[-2]:8.3f}"
    return line + (f" {vals[-1]:8.2f}" if forward else "")


if __name__ == "__main__":
    main()
