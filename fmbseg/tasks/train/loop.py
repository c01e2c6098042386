"""The stage-2 optimisation loop, its epoch checkpoints and its loss curve.

A checkpoint (``stages/train/{fp}/checkpoints/epoch-{k:04d}.pt``, only the latest kept) holds
the module, optimizer and scheduler states, the number of finished epochs, the losses so far
and the RNG states; it is loaded with ``torch.load(weights_only=True)``. Because each epoch's
batch order depends only on ``(seed, epoch)`` (:class:`~fmbseg.tasks.train.data.EpochOrder`),
resuming after epoch k replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fmbseg.config import TrainConfig
from fmbseg.models.align import AlignmentModule, alignment_loss
from fmbseg.models.base import PatchEncoder
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.train.data import EpochOrder
from fmbseg.tasks.train.features import autocast_for, encode_batch

STAGE = "train"


# ---- checkpoints ------------------------------------------------------------------------------


def _ckpt_dir(fp: str) -> str:
    return f"{ArtifactStore.stage_rel(STAGE, fp)}/checkpoints"


def save_checkpoint(store: ArtifactStore, fp: str, state: dict[str, Any]) -> None:
    """Write ``epoch-{epoch:04d}.pt`` and remove older epochs' checkpoints."""
    buf = io.BytesIO()
    torch.save(state, buf)
    name = f"epoch-{state['epoch']:04d}.pt"
    store.write_bytes(f"{_ckpt_dir(fp)}/{name}", buf.getvalue())
    for old in store.ls(_ckpt_dir(fp)):
        if old.startswith("epoch-") and old.endswith(".pt") and old < name:
            store.delete(f"{_ckpt_dir(fp)}/{old}")


def load_checkpoint(store: ArtifactStore, fp: str) -> dict[str, Any] | None:
    """The latest epoch checkpoint of training run ``fp``, or None."""
    names = [n for n in store.ls(_ckpt_dir(fp)) if n.startswith("epoch-") and n.endswith(".pt")]
    if not names:
        return None
    blob = store.read_bytes(f"{_ckpt_dir(fp)}/{max(names)}")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop --------------------------------------------------------------------------------


def train_loop(
    module: AlignmentModule,
    loader: DataLoader,
    sampler: EpochOrder,
    text: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    *,
    encoder: PatchEncoder | None,
    start: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[float], list[float]]:
    """SGD + per-step cosine annealing over ``cfg.epochs``; returns (epoch, step) losses.

    ``encoder``: given when the loader yields images (no feature cache). ``start``: a
    checkpoint to resume from. ``on_epoch(state)`` receives each finished epoch's checkpoint.
    """
    opt = torch.optim.SGD(
        module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    total = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    epoch_losses: list[float] = []
    step_losses: list[float] = []
    first = 0
    if start is not None:
        module.load_state_dict(start["module"])
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        _set_rng_state(start["rng"])
        first = int(start["epoch"])
        epoch_losses = [float(v) for v in start["epoch_losses"]]
        step_losses = start["step_losses"].tolist()
    module.train()
    for epoch in range(first, cfg.epochs):
        sampler.set_epoch(epoch)
        losses = []
        for x, y in loader:
            feats = encode_batch(encoder, x, device) if encoder is not None else x.to(device)
            with autocast_for(device):
                z = module(feats)
            loss = alignment_loss(
                z.reshape(-1, z.shape[-1]),
                y.to(device).reshape(-1),
                text,
                cfg.temperature,
                cfg.text_negatives,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError(
                f"training diverged in epoch {epoch + 1}: loss is not "
                f"finite (lower train.lr, now {cfg.lr})"
            )
        step_losses.extend(losses)
        epoch_losses.append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(
                {
                    "module": module.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "epoch_losses": list(epoch_losses),
                    "step_losses": torch.tensor(step_losses, dtype=torch.float64),
                    "rng": _rng_state(),
                }
            )
    return epoch_losses, step_losses


def loss_curve_png(epoch_losses: list[float], step_losses: list[float]) -> bytes:
    """A PNG of the per-step loss and per-epoch means (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps_per_epoch = len(step_losses) / max(len(epoch_losses), 1)
    ax.plot(
        np.arange(1, len(step_losses) + 1) / steps_per_epoch,
        step_losses,
        lw=0.8,
        alpha=0.6,
        label="step",
    )
    ax.plot(np.arange(1, len(epoch_losses) + 1), epoch_losses, "o-", label="epoch mean")
    ax.set(xlabel="epoch", ylabel="alignment loss", title="stage-2 training loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
