"""Alignment loss: vectorised (logsumexp) forward+backward vs. a per-patch Python loop.

Both compute METHOD.md stage 2's loss on the same random batch; the script checks they agree,
then prints the time of each, their ratio and the peak memory of the vectorised loss,
measured in this run. Text negatives are every vocabulary prototype (``--negatives all``,
the default, as ``train.text_negatives``) or only the batch's classes (``batch``).

Two batches: a small one (``--patches``, default 256, ``--classes`` 20) and the paper's
batch, 5 images of DINOv2 ViT-L/14 at ``train.input_size`` 448 (32x32 patches, M = 5120,
D = 768) with the COCO-Stuff vocabulary (K = 171), ~20% of patches ignored. The loop at the
paper's batch takes minutes; ``--skip-paper-loop`` times only the vectorised loss there.
Peak memory: what one forward + backward adds to the memory in use before it: CUDA's
``max_memory_allocated`` on a GPU (``--device cuda``), on CPU the process's peak resident
set (its peak restarted first on Linux; elsewhere the lifetime peak, whose growth is only
meaningful the first time a size is reached, so the paper batch is measured first).

    python bench/loss.py [--patches 256] [--classes 20] [--negatives all|batch]
                         [--repeat 3] [--threads 1] [--device cpu] [--skip-paper-loop]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import memory_kind, parser, peak_memory, timed

from fmbseg.models.align import alignment_loss

PAPER_IMAGES, PAPER_GRID, PAPER_DIM, PAPER_CLASSES = 5, 448 // 14, 768, 171


def loop_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, tau: float, negatives: str
) -> torch.Tensor:
    """The formula patch by patch: D_i, L_t(k), L_p(i) as written in METHOD.md."""
    keep = labels >= 0
    zn, y = F.normalize(z[keep], dim=-1), labels[keep]
    ys = y.tolist()
    present = sorted(set(ys))
    tn = F.normalize(text, dim=-1)
    t_neg = tn if negatives == "all" else tn[present]
    members: dict[int, list[int]] = {}
    for i, k in enumerate(ys):
        members.setdefault(k, []).append(i)
    log_d = []
    for i in range(len(ys)):
        # z_j·z_i for every j, then drop j = i (slicing a vector, not copying zn per patch,
        # keeps the autograd graph at O(L) floats per patch: the paper batch fits in memory)
        s_pp = zn @ zn[i]
        others = torch.cat([s_pp[:i], s_pp[i + 1 :]])
        log_d.append(torch.logsumexp(torch.cat([others, t_neg @ zn[i]]) / tau, 0))
    l_t = []
    for k in present:
        l_t.append(torch.stack([log_d[i] - zn[i] @ tn[k] / tau for i in members[k]]).mean())
    l_p = []
    for i, k in enumerate(ys):
        pos = [j for j in members[k] if j != i]
        if pos:
            l_p.append((log_d[i] - (zn[pos] @ zn[i]) / tau).mean())
    total = torch.stack(l_t).mean()
    return total + torch.stack(l_p).mean() if l_p else total


def batch(
    m: int, d: int, k: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g)
    labels = torch.randint(0, k, (m,), generator=g)
    labels[torch.rand(m, generator=g) < 0.2] = -1
    text = torch.randn(k, d, generator=g)
    return z.to(device).requires_grad_(True), labels.to(device), text.to(device)


def compare(
    m: int, d: int, k: int, args: argparse.Namespace, device: torch.device, loop: bool
) -> None:
    z, labels, text = batch(m, d, k, device)
    tau = 0.1

    def run(fn):
        def step():
            z.grad = None
            fn(z, labels, text, tau, args.negatives).backward()

        return step

    with peak_memory(memory_kind(device)) as peak:
        run(alignment_loss)()
    memory = peak.growth / 1e6
    a = alignment_loss(z, labels, text, tau, args.negatives)
    t_vec = timed(run(alignment_loss), repeat=args.repeat).best
    labelled = int((labels >= 0).sum())
    print(
        f"M={m} patches ({labelled} labelled), D={d}, K={k}, negatives={args.negatives}, "
        f"{device.type}, {args.threads} thread(s)"
    )
    line = f"  fwd+bwd: vectorised {t_vec * 1e3:.2f} ms"
    if loop:
        b = loop_loss(z, labels, text, tau, args.negatives)
        assert torch.allclose(a, b, atol=1e-4), (a.item(), b.item())
        t_loop = timed(run(loop_loss)).seconds
        print(f"  loss values: vectorised {a.item():.6f}  loop {b.item():.6f}")
        line += f"  loop {t_loop * 1e3:.1f} ms  ratio loop/vectorised = {t_loop / t_vec:.0f}x"
    print(line)
    print(
        f"  vectorised peak memory over one fwd+bwd: {memory:.0f} MB "
        f"(one (L, L) float32 logit matrix: {labelled * labelled * 4 / 1e6:.1f} MB)"
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--negatives", choices=("all", "batch"), default="all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-paper-loop", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    m = PAPER_IMAGES * PAPER_GRID * PAPER_GRID
    print(f"paper batch: {PAPER_IMAGES} images x {PAPER_GRID}x{PAPER_GRID} patches (448 px, /14)")
    compare(m, PAPER_DIM, PAPER_CLASSES, args, device, loop=not args.skip_paper_loop)
    compare(args.patches, args.dim, args.classes, args, device, loop=True)


if __name__ == "__main__":
    main()
