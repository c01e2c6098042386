"""Stage-2 training step throughput (images/s) on CPU with the tiny models.

Times one optimisation step (module forward, alignment loss, backward, SGD + cosine step)
with the real tiny DINOv2 from the model registry, two ways, in this run:
  - features computed by the encoder in the step (``train.cache_features=false``), and
  - features read from the cache (what ``train.cache_features=true`` buys after epoch 1),
and prints both rates and their ratio.

    python bench/train.py [--batch 5] [--input-size 224] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import functools

import torch
from harness import parser, timed

from fmbseg.config import TrainConfig
from fmbseg.models.align import AlignmentConfig, AlignmentModule, alignment_loss
from fmbseg.models.registry import build_model
from fmbseg.tasks.train.features import encode_batch


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--input-size", type=int, default=224, help="multiple of 14")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cpu")
    encoder = build_model("dinov2_tiny", None, dev, kind="dino", img_size=args.input_size)
    tcfg = TrainConfig()
    module = AlignmentModule(
        AlignmentConfig(encoder.embed_dim, args.text_dim, heads=2, mlp_ratio=tcfg.mlp_ratio)
    )
    opt = torch.optim.SGD(
        module.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4 * args.steps)
    text = torch.randn(args.classes, args.text_dim)
    g = args.input_size // encoder.preprocess.patch_size
    images = torch.randn(args.batch, 3, args.input_size, args.input_size)
    labels = torch.randint(-1, args.classes, (args.batch, g * g))
    cached = encode_batch(encoder, images, dev)

    def step(with_encoder: bool) -> None:
        feats = encode_batch(encoder, images, dev) if with_encoder else cached.clone()
        z = module(feats)
        loss = alignment_loss(
            z.reshape(-1, z.shape[-1]), labels.reshape(-1), text, tcfg.temperature
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    rates = {
        mode: args.batch / timed(functools.partial(step, mode), number=args.steps, warmup=1).seconds
        for mode in (True, False)
    }
    print(
        f"dinov2_tiny (C={encoder.embed_dim}) at {args.input_size}px ({g}x{g} patches), "
        f"batch {args.batch}, {args.threads} CPU thread(s)"
    )
    print(f"  encoder in the step: {rates[True]:.1f} images/s")
    print(f"  cached features:     {rates[False]:.1f} images/s")
    print(f"  ratio cached/encoder = {rates[False] / rates[True]:.2f}x")


if __name__ == "__main__":
    main()
