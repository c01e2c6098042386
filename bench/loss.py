"""Alignment loss: vectorised (logsumexp) forward+backward vs. a per-patch Python loop.

Both compute METHOD.md stage 2's loss on the same random batch; the script checks they agree,
then prints the time of each and their ratio, measured in this run. The loop is only feasible
for small batches, so the ratio is taken at ``--patches`` (default 256); the vectorised loss
is also timed at the paper's batch (5 images x 32x32 patches, D=768).

    python bench/loss.py [--patches 256] [--dim 768] [--classes 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fmbseg.models.align import alignment_loss


def loop_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, tau: float
) -> torch.Tensor:
    """The formula patch by patch: D_i, L_t(k), L_p(i) as written in METHOD.md."""
    keep = labels >= 0
    zn, y = F.normalize(z[keep], dim=-1), labels[keep]
    present = sorted(set(y.tolist()))
    tn = {k: F.normalize(text[k], dim=-1) for k in present}
    t_all = torch.stack([tn[k] for k in present])
    log_d = []
    for i in range(len(y)):
        others = torch.cat([zn[:i], zn[i + 1 :]])
        log_d.append(torch.logsumexp(torch.cat([others @ zn[i], t_all @ zn[i]]) / tau, 0))
    l_t = []
    for k in present:
        idx = [i for i in range(len(y)) if int(y[i]) == k]
        l_t.append(torch.stack([log_d[i] - zn[i] @ tn[k] / tau for i in idx]).mean())
    l_p = []
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and int(y[j]) == int(y[i])]
        if pos:
            l_p.append((log_d[i] - (zn[pos] @ zn[i]) / tau).mean())
    total = torch.stack(l_t).mean()
    return total + torch.stack(l_p).mean() if l_p else total


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def batch(m: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, requires_grad=True)
    labels = torch.randint(0, k, (m,), generator=g)
    labels[torch.rand(m, generator=g) < 0.2] = -1
    return z, labels, torch.randn(k, d, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tau = 0.1
    z, labels, text = batch(args.patches, args.dim, args.classes)

    def run(fn):
        def step():
            z.grad = None
            fn(z, labels, text, tau).backward()

        return step

    a, b = alignment_loss(z, labels, text, tau), loop_loss(z, labels, text, tau)
    assert torch.allclose(a, b, atol=1e-4), (a.item(), b.item())
    t_vec = timed(run(alignment_loss), args.repeat)
    t_loop = timed(run(loop_loss), max(1, args.repeat // 2))
    print(f"M={args.patches} patches, D={args.dim}, K={args.classes}, {args.threads} thread(s)")
    print(f"  loss values: vectorised {a.item():.6f}  loop {b.item():.6f}")
    print(
        f"  fwd+bwd: vectorised {t_vec * 1e3:.2f} ms  loop {t_loop * 1e3:.1f} ms  "
        f"ratio loop/vectorised = {t_loop / t_vec:.0f}x"
    )

    m = 5 * 32 * 32
    z, labels, text = batch(m, 768, 171)
    t_full = timed(run(alignment_loss), args.repeat)
    print(
        f"paper batch M={m}, D=768, K=171: vectorised fwd+bwd {t_full * 1e3:.0f} ms "
        f"(logit matrix {m * m * 4 / 1e6:.1f} MB)"
    )


if __name__ == "__main__":
    main()
