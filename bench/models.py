"""Dense CLIP: one trunk pass for CLS + dense features vs. two separate passes.

Prints the time of ``crops_and_dense`` and of ``crop_embeddings`` + ``dense_features`` on
the same crops, and their ratio (the saving the one-pass API buys the clip_dense stage).
Random weights: speed does not depend on them.

    .venv/bin/python bench/models.py                      # clip_tiny, CPU
    .venv/bin/python bench/models.py clip_vit_l14_336 cuda 16 sclip [--precision fp32]
"""

from __future__ import annotations

import torch
from harness import parser, peak_bytes, timed

from fmbseg.models import build_model


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("name", nargs="?", default="clip_tiny", help="a registered CLIP model")
    ap.add_argument("device", nargs="?", default="cpu")
    ap.add_argument("batch", nargs="?", type=int, default=16, help="crops per forward pass")
    ap.add_argument("mode", nargs="?", default="maskclip", choices=["maskclip", "sclip"])
    ap.add_argument(
        "--precision",
        default="auto",
        help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp16 or fp32",
    )
    args = ap.parse_args()
    clip = build_model(args.name, None, args.device, mode=args.mode, precision=args.precision)
    size = clip.preprocess.input_size
    crops = torch.randn(args.batch, 3, size, size, device=clip.device)
    one = timed(lambda: clip.crops_and_dense(crops), repeat=5, warmup=1).best
    two = timed(
        lambda: (clip.crop_embeddings(crops), clip.dense_features(crops)), repeat=5, warmup=1
    ).best
    print(
        f"{args.name} {args.mode} on {clip.device} ({clip.dtype}), {args.batch} crops of {size}px"
    )
    print(f"  crops_and_dense (one trunk pass): {one * 1e3:8.1f} ms")
    print(f"  crop_embeddings + dense_features: {two * 1e3:8.1f} ms")
    print(f"  two passes / one pass:            {two / one:8.2f}x")
    if clip.device.type == "cuda":
        print(f"  peak GPU memory:                  {peak_bytes('cuda') / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
