"""The dense paths' layers on an open_clip ViT (METHOD 1.1.1).

The pre-last-block tokens feed a modified last block on every token, then ``ln_post`` and
``proj``, giving dense features in the joint image-text space:

- ``maskclip``: attention replaced by its value path, ``x + ls_1(out_proj(v_proj(ln_1(x))))``;
- ``sclip``: correlative self-attention, weights ``softmax(q qᵀ s) + softmax(k kᵀ s)``
  (``s = head_dim^-0.5``, per head) applied to ``v`` with the pretrained in/out projections;

both followed by the block's usual ``x + ls_2(mlp(ln_2(x)))``. Positional embeddings are
interpolated with plain bicubic (CLS kept) when the crop grid differs from the native one,
as MaskCLIP, SCLIP and CLIP-DINOiser do (:func:`interpolate_pos_embed`).
Supported: open_clip ``VisionTransformer`` towers with the default residual blocks
(``nn.MultiheadAttention``, optional layer scale), CLS pooling, no attentional pooler
(:func:`check_supported` says what else it found).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

Mode = Literal["maskclip", "sclip"]
MODES: tuple[str, ...] = ("maskclip", "sclip")


class UnsupportedModelError(ValueError):
    """The CLIP variant has a tower the dense paths do not know how to modify."""


def check_supported(visual: Any, name: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``visual`` is a plain open_clip ViT."""
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"{name}: the image tower is {type(visual).__name__}; dense CLIP needs an open_clip "
            "VisionTransformer (ResNet and timm towers are not supported)"
        )
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional pooler")
    if visual.pool_type != "tok":
        problems.append(f"pool_type={visual.pool_type!r} (CLS token pooling needed)")
    if visual.proj is None:
        problems.append("no visual projection")
    for i, blk in enumerate(visual.transformer.resblocks):
        if not isinstance(blk, ResidualAttentionBlock) or hasattr(blk, "ln_1_kv"):
            problems.append(f"block {i} is {type(blk).__name__} (custom attention blocks)")
            break
        attn = blk.attn
        if not (
            isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim
            and attn.bias_k is None
            and not attn.add_zero_attn
        ):
            problems.append(f"block {i} attention is not a plain packed nn.MultiheadAttention")
            break
    if problems:
        raise UnsupportedModelError(f"{name}: unsupported CLIP variant: {', '.join(problems)}")


def interpolate_pos_embed(
    pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """``(1 + gh*gw, C)`` positional embedding of the ``native`` grid -> the ``grid`` one.

    The CLS row is kept; the patch rows, reshaped to ``(1, C, gh, gw)``, are resampled with
    ``F.interpolate(mode="bicubic", align_corners=False)`` and no antialiasing, in both
    directions: the call the dense-CLIP references publish (the mmseg-style
    ``resize_pos_embed`` of MaskCLIP and SCLIP, which CLIP-DINOiser's MaskCLIP reuses), so
    features on windows larger than the CLIP input match theirs. open_clip's
    checkpoint-loading ``resize_pos_embed`` antialiases, which when enlarging is a different
    kernel (PIL's cubic, a=-0.5, instead of a=-0.75); it is not used here. The identity when
    ``grid == native``.
    """
    cls, patches = pos[:1], pos[1:]
    c = patches.shape[-1]
    img = patches.reshape(1, native[0], native[1], c).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=grid, mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c).to(pos.dtype)
    return torch.cat([cls, patches], dim=0)


def sclip_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """SCLIP's correlative attention: ``softmax(q qᵀ s) + softmax(k kᵀ s)``.

    ``q``, ``k``: ``(B, heads, L, head_dim)``. Returns ``(B, heads, L, L)``; every row sums
    to 2 (two stochastic matrices), which is how SCLIP defines it (no renormalisation).
    """
    qq = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
    kk = torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
    return qq + kk


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def dense_last_block(blk: ResidualAttentionBlock, x: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The modified last block on batch-first tokens ``(B, L, C)`` -> ``(B, L, C)``."""
    attn: nn.MultiheadAttention = blk.attn  # type: ignore[assignment]
    y = blk.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    c = x.shape[-1]
    if mode == "maskclip":
        v = F.linear(y, w[2 * c :], None if b is None else b[2 * c :])
        out = attn.out_proj(v)
    else:
        q, k, v = (_split_heads(t, attn.num_heads) for t in F.linear(y, w, b).chunk(3, dim=-1))
        weights = sclip_attention_weights(q, k, attn.head_dim**-0.5)
        out = attn.out_proj((weights @ v).transpose(1, 2).reshape(x.shape))
    x = x + blk.ls_1(out)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
