"""Stage 2's lightweight alignment module and its contrastive loss (METHOD.md, stage 2).

The module maps frozen DINOv2 patch features ``(B, N, C)`` into the CLIP text-embedding space
``(B, N, D)`` with one pre-norm transformer block (multi-head self-attention over the image's
patches + MLP, residuals) followed by a linear map. There is no cross-attention with text, so any
vocabulary can be used at test time: the text embeddings only enter through cosine similarity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

CARD_KIND = "fmbseg-alignment"  # the model card's "kind" of a trained alignment module


class IncompatibleModelError(ValueError):
    """A checkpoint and an encoder / text model do not fit together; the message says why."""


TextNegatives = Literal["all", "batch"]  # train.text_negatives


@dataclass(frozen=True)
class AlignmentConfig:
    """Everything needed to rebuild an :class:`AlignmentModule` (saved in its model card)."""

    in_dim: int  # C, the patch-encoder (DINOv2) width: 1024 for ViT-L/14
    out_dim: int  # D, the CLIP text-embedding width: 768 for ViT-L/14
    heads: int = 16  # attention heads; in_dim must be divisible by it
    mlp_ratio: float = 4.0  # MLP hidden width = round(in_dim * mlp_ratio)

    def __post_init__(self) -> None:
        for key in ("in_dim", "out_dim", "heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AlignmentConfig.{key} must be a positive integer, got {value!r}")
        if self.in_dim % self.heads:
            raise ValueError(
                f"AlignmentConfig: in_dim={self.in_dim} is not divisible by heads={self.heads}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"AlignmentConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def hidden_dim(self) -> int:
        return max(1, round(self.in_dim * self.mlp_ratio))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignmentConfig:
        """From a card's ``module`` entry; unknown or missing keys are an error naming them."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AlignmentConfig: unknown keys {unknown}; allowed {sorted(names)}")
        missing = sorted({"in_dim", "out_dim"} - set(d))
        if missing:
            raise ValueError(f"AlignmentConfig: missing keys {missing}")
        return cls(**d)


def alignment_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    negatives: TextNegatives = "all",
) -> torch.Tensor:
    """Patch-text + patch-patch contrastive loss of METHOD.md stage 2 (paper Eq. 1-4).

    Args:
        z: ``(M, D) float`` module outputs of every patch of the batch (all images flattened).
        labels: ``(M,) int64`` class index of each patch into the rows of ``text``; ``-1`` =
            ignored (the patch takes no part in the loss, not even as a negative).
        text: ``(K, D) float`` text embeddings of the whole training vocabulary (row k =
            class k).
        temperature: τ > 0.
        negatives: which text prototypes enter the denominators. ``"all"`` (the paper: its K
            is the number of categories in the dataset): all K rows of ``text``, so every
            vocabulary prototype is a negative for every patch, also the classes absent from
            the batch. ``"batch"`` (ablation): only the classes present among the batch's
            labelled patches; the other rows of ``text`` take no part at all.

    Returns:
        A scalar float32 tensor, differentiable w.r.t. ``z`` (and ``text`` if it requires grad).

    Definitions, over the L labelled patches; P = the classes present among them; T = the
    prototypes in the denominators (all K with ``"all"``, P with ``"batch"``):
        z_i, t_k are L2-normalised; s(a, b) = a·b / τ.
        D_i = Σ_{j≠i} exp(s(z_i, z_j)) + Σ_{k∈T} exp(s(z_i, t_k)) — every other labelled
        patch (same class or not, from any image of the batch) and every prototype of T,
        including patch i's own class.
        L_t(k) = −(1/N_k) Σ_{i: y_i=k} [s(z_i, t_k) − log D_i]   for k ∈ P (N_k patches)
        L_p(i) = −(1/|P(i)|) Σ_{j∈P(i)} [s(z_i, z_j) − log D_i],  P(i) = {j ≠ i: y_j = y_i}
        L = (1/|P|) Σ_{k∈P} L_t(k) + mean over patches with |P(i)| ≥ 1 of L_p(i).
    Normalisation choices (ours; the paper does not state them): the text term has one
    summand per class *present* (an absent class has no positive pair, only negatives), and
    each present class weighs the same whatever its size; a patch that is the only one of its
    class in the batch has no positive pair, contributes no L_p term and is left out of that
    mean's count (if no patch has a positive, the patch term is 0); the two terms are summed
    with weight 1 each. Computed in float32 even under autocast.

    Vectorised: Σ_{j∈P(i)} z_i·z_j = z_i·(c_{y_i} − z_i) with c_k the sum of class k's
    patches, so positives need no (M, M) mask, and log D_i is one row-wise logsumexp over the
    (L, L) patch logits (diagonal set to −inf) combined with the (L, |T|) text logits by
    logaddexp (numerically stable: no exp is taken of an unshifted logit).

    Memory: O(L² + L·(D + K)); the (L, L) logits and their backward copies dominate
    (``bench/loss.py`` prints the measured peak).
    """
    if negatives not in ("all", "batch"):
        raise ValueError(f"alignment_loss: negatives must be 'all' or 'batch', got {negatives!r}")
    if z.dim() != 2 or labels.dim() != 1 or z.shape[0] != labels.shape[0]:
        raise ValueError(
            f"alignment_loss: z must be (M, D) and labels (M,), got "
            f"{tuple(z.shape)} and {tuple(labels.shape)}"
        )
    if text.dim() != 2 or text.shape[1] != z.shape[1]:
        raise ValueError(f"alignment_loss: text must be (K, {z.shape[1]}), got {tuple(text.shape)}")
    if not temperature > 0:
        raise ValueError(f"alignment_loss: temperature must be > 0, got {temperature!r}")
    keep = labels >= 0
    y_all = labels[keep]
    if y_all.numel() == 0:
        raise ValueError("alignment_loss: the batch has no labelled patch (every label is -1)")
    if int(y_all.max()) >= text.shape[0]:
        raise ValueError(
            f"alignment_loss: label {int(y_all.max())} is out of range for "
            f"{text.shape[0]} text embeddings"
        )

    with torch.autocast(device_type=z.device.type, enabled=False):
        zn = F.normalize(z[keep].float(), dim=-1)  # (L, D)
        present, y = torch.unique(y_all, return_inverse=True)  # (P,), (L,) in 0..P-1
        if negatives == "all":
            tn = F.normalize(text.float(), dim=-1)  # (K, D)
            own = y_all  # column of each patch's own prototype
        else:
            tn = F.normalize(text[present].float(), dim=-1)  # (P, D)
            own = y
        inv_t = 1.0 / temperature
        n_points = zn.shape[0]
        s_text = (zn @ tn.T) * inv_t  # (L, |T|)
        log_d = torch.logsumexp(s_text, dim=1)  # (L,)
        if n_points > 1:
            s_pp = (zn * inv_t) @ zn.T  # (L, L)
            s_pp.diagonal().fill_(-math.inf)  # j ≠ i; mm does not keep its output for backward
            log_d = torch.logaddexp(log_d, torch.logsumexp(s_pp, dim=1))

        counts = torch.bincount(y, minlength=present.numel()).to(zn.dtype)  # N_k, (P,)
        # Patch-text: mean over present classes of the per-class mean of -(s_ik - log D_i).
        per_patch_t = log_d - s_text.gather(1, own[:, None]).squeeze(1)  # (L,)
        sum_t = torch.zeros_like(counts).index_add_(0, y, per_patch_t)
        loss_t = (sum_t / counts).mean()

        # Patch-patch: Σ_{j∈P(i)} s_ij = z_i·(c_{y_i} − z_i)/τ and |P(i)| = N_{y_i} − 1.
        class_sum = torch.zeros(
            present.numel(), zn.shape[1], dtype=zn.dtype, device=zn.device
        ).index_add_(0, y, zn)  # (P, D)
        n_pos = counts[y] - 1  # (L,)
        has_pos = n_pos > 0
        if bool(has_pos.any()):
            pos_sum = ((class_sum[y] - zn) * zn).sum(1) * inv_t  # (L,)
            per_patch_p = log_d - pos_sum / n_pos.clamp(min=1)
            loss_p = per_patch_p[has_pos].mean()
        else:
            loss_p = zn.new_zeros(())
        return loss_t + loss_p


class AlignmentModule(nn.Module):
    """One pre-norm transformer block over an image's patches, then a linear map to D.

    ``x = x + Attn(LN(x)); x = x + MLP(LN(x)); z = Linear(x)``. ``forward`` takes
    ``(B, N, C) float`` patch features (any N: the block has no positional embedding; DINOv2's
    features already carry position) and returns ``(B, N, D)`` *unnormalised* embeddings.
    """

    loss = staticmethod(alignment_loss)  # the module carries its objective

    def __init__(self, cfg: AlignmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.in_dim
        self.norm1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.attn_out = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(
            nn.Linear(c, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, c)
        )
        self.proj = nn.Linear(c, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.in_dim:
            raise ValueError(
                f"AlignmentModule expects (B, N, {self.cfg.in_dim}) patch features, "
                f"got shape {tuple(x.shape)}"
            )
        b, n, c = x.shape
        h = self.cfg.heads
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, c/h)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, n, c))
        x = x + self.mlp(self.norm2(x))
        return self.proj(x)
