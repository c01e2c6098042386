"""Dense CLIP: one trunk pass for CLS + dense features vs. two separate passes.

Prints the time of ``crops_and_dense`` and of ``crop_embeddings`` + ``dense_features`` on
the same crops, and their ratio (the saving the one-pass API buys the clip_dense stage).
Random weights: speed does not depend on them.

    .venv/bin/python bench/models.py                      # clip_tiny, CPU
    .venv/bin/python bench/models.py clip_vit_l14_336 cuda 16 sclip
"""

from __future__ import annotations

import sys
import time

import torch

from fmbseg.models import build_model


def _time(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "clip_tiny"
    device = argv[1] if len(argv) > 1 else "cpu"
    batch = int(argv[2]) if len(argv) > 2 else 16
    mode = argv[3] if len(argv) > 3 else "maskclip"
    clip = build_model(name, None, device, mode=mode)
    size = clip.preprocess.input_size
    crops = torch.randn(batch, 3, size, size, device=clip.device)
    clip.crops_and_dense(crops)  # warm-up
    one = _time(lambda: clip.crops_and_dense(crops), 5)
    two = _time(lambda: (clip.crop_embeddings(crops), clip.dense_features(crops)), 5)
    print(f"{name} {mode} on {clip.device} ({clip.dtype}), {batch} crops of {size}px")
    print(f"  crops_and_dense (one trunk pass): {one * 1e3:8.1f} ms")
    print(f"  crop_embeddings + dense_features: {two * 1e3:8.1f} ms")
    print(f"  two passes / one pass:            {two / one:8.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
