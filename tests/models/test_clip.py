"""Dense CLIP: the standard path is untouched, MaskCLIP / SCLIP match their formulas."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fmbseg.models import build_model
from fmbseg.models.base import DenseClip
from fmbseg.models.clip import TINY_CLIP_CFG, OpenClipDense
from fmbseg.models.clip_layers import (
    UnsupportedModelError,
    interpolate_pos_embed,
    sclip_attention_weights,
)
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def maskclip() -> OpenClipDense:
    return build_model("clip_tiny", None, "cpu", mode="maskclip")


@pytest.fixture(scope="module")
def sclip() -> OpenClipDense:
    return build_model("clip_tiny", None, "cpu", mode="sclip")


def _crops(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pre_last_tokens(clip: OpenClipDense, crops: torch.Tensor) -> torch.Tensor:
    """Tokens before the last block, computed with open_clip's own embedding code."""
    v = clip.visual
    x = v._embeds(crops)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def _head(clip: OpenClipDense, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post + proj on patch tokens -> (B, D, h, w)."""
    feats = clip.visual.ln_post(tokens[:, 1:]) @ clip.visual.proj
    side = int(feats.shape[1] ** 0.5)
    return feats.reshape(feats.shape[0], side, side, -1).permute(0, 3, 1, 2)


def test_tiny_clip_implements_protocol_and_preprocess(maskclip: OpenClipDense) -> None:
    assert isinstance(maskclip, DenseClip)
    pp = maskclip.preprocess
    assert (pp.input_size, pp.patch_size) == (64, 16)
    assert pp.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert pp.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert maskclip.embed_dim == TINY_CLIP_CFG["embed_dim"]
    assert maskclip.dtype == torch.float32


@pytest.mark.parametrize("mode", ["maskclip", "sclip"])
def test_cls_path_equals_open_clip_encode_image(
    mode: str, maskclip: OpenClipDense, sclip: OpenClipDense
) -> None:
    clip = maskclip if mode == "maskclip" else sclip
    crops = _crops()
    cls, dense = clip.crops_and_dense(crops)
    ref = clip.model.encode_image(crops, normalize=True)
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=1e-5)
    assert cls.dtype == dense.dtype == torch.float32
    assert dense.shape == (2, 32, 4, 4)
    torch.testing.assert_close(clip.crop_embeddings(crops), cls)
    torch.testing.assert_close(clip.dense_features(crops), dense)


def test_maskclip_equals_last_block_with_identity_attention(maskclip: OpenClipDense) -> None:
    crops = _crops()
    x = _pre_last_tokens(maskclip, crops)
    # With attention restricted to the diagonal, softmax is the identity matrix, so open_clip's
    # own block computes x + out_proj(v_proj(ln_1(x))) followed by its MLP: MaskCLIP.
    n = x.shape[1]
    diag_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    y = maskclip.visual.transformer.resblocks[-1](x, attn_mask=diag_only)
    torch.testing.assert_close(
        maskclip.dense_features(crops), _head(maskclip, y), atol=1e-5, rtol=1e-4
    )


def test_maskclip_equals_manual_value_path(maskclip: OpenClipDense) -> None:
    crops = _crops(seed=3)
    x = _pre_last_tokens(maskclip, crops)
    blk = maskclip.visual.transformer.resblocks[-1]
    c = x.shape[-1]
    w_v, b_v = blk.attn.in_proj_weight[2 * c :], blk.attn.in_proj_bias[2 * c :]
    v = blk.ln_1(x) @ w_v.T + b_v
    y = x + v @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    y = y + blk.mlp(blk.ln_2(y))
    torch.testing.assert_close(
        maskclip.dense_features(crops), _head(maskclip, y), atol=1e-5, rtol=1e-4
    )
    # and it is not simply the standard block (attention does mix tokens there)
    assert not torch.allclose(_head(maskclip, blk(x)), _head(maskclip, y), atol=1e-3)


def test_sclip_weights_rows_sum_to_two() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    w = sclip_attention_weights(q, k, 0.5)
    torch.testing.assert_close(w.sum(-1), torch.full((2, 3, 7), 2.0))
    naive = torch.empty(2, 3, 7, 7)
    for b in range(2):
        for h in range(3):
            for i in range(7):
                qi = torch.tensor([float(q[b, h, i] @ q[b, h, j]) * 0.5 for j in range(7)])
                ki = torch.tensor([float(k[b, h, i] @ k[b, h, j]) * 0.5 for j in range(7)])
                naive[b, h, i] = qi.exp() / qi.exp().sum() + ki.exp() / ki.exp().sum()
    torch.testing.assert_close(w, naive, atol=1e-6, rtol=1e-5)


def test_sclip_dense_equals_naive_per_head(sclip: OpenClipDense) -> None:
    crops = _crops(1, seed=5)
    x = _pre_last_tokens(sclip, crops).double()[0]  # (L, C), float64 reference
    blk = sclip.visual.transformer.resblocks[-1].double()
    try:
        c, heads = x.shape[-1], blk.attn.num_heads
        hd = c // heads
        y = blk.ln_1(x)
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        q, k, v = (y @ w[i * c : (i + 1) * c].T + b[i * c : (i + 1) * c] for i in range(3))
        out = torch.empty_like(x)
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            a = torch.softmax(q[:, sl] @ q[:, sl].T * hd**-0.5, -1) + torch.softmax(
                k[:, sl] @ k[:, sl].T * hd**-0.5, -1
            )
            out[:, sl] = a @ v[:, sl]
        z = x + blk.attn.out_proj(out)
        z = z + blk.mlp(blk.ln_2(z))
        ref = (sclip.visual.ln_post.double()(z[1:]) @ sclip.visual.proj.double()).float()
    finally:
        sclip.model.float()
    got = sclip.dense_features(crops)[0].flatten(1).T  # (h*w, D)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_modes_differ(maskclip: OpenClipDense, sclip: OpenClipDense) -> None:
    crops = _crops()
    assert not torch.allclose(
        maskclip.dense_features(crops), sclip.dense_features(crops), atol=1e-3
    )


def test_pos_embed_interpolation_identity_and_shapes(maskclip: OpenClipDense) -> None:
    pos = maskclip.visual.positional_embedding.detach()
    torch.testing.assert_close(interpolate_pos_embed(pos, (4, 4), (4, 4)), pos)
    assert maskclip.pos_embed((4, 4)) is maskclip.visual.positional_embedding
    bigger = interpolate_pos_embed(pos, (4, 4), (6, 8))
    assert bigger.shape == (1 + 48, pos.shape[1])
    torch.testing.assert_close(bigger[0], pos[0])  # CLS row kept
    # a constant grid stays constant under bicubic resampling
    const = torch.cat([pos[:1], torch.ones(16, pos.shape[1])])
    torch.testing.assert_close(
        interpolate_pos_embed(const, (4, 4), (6, 8))[1:], torch.ones(48, pos.shape[1])
    )


def _reference_resize(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]):
    # The call MaskCLIP / SCLIP / CLIP-DINOiser publish: plain bicubic on the reshaped grid.
    c = pos.shape[-1]
    img = pos[1:].reshape(1, *native, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(-1, c)])


@pytest.mark.parametrize("grid", [(6, 8), (28, 28), (2, 3)])
def test_pos_embed_resize_is_the_references_plain_bicubic(
    grid: tuple[int, int], maskclip: OpenClipDense
) -> None:
    pos = maskclip.visual.positional_embedding.detach()
    ours = interpolate_pos_embed(pos, (4, 4), grid)
    torch.testing.assert_close(ours, _reference_resize(pos, (4, 4), grid), atol=0, rtol=0)
    # open_clip's antialiased resize is another kernel, enlarging and shrinking alike
    c = pos.shape[-1]
    img = pos[1:].reshape(1, 4, 4, c).permute(0, 3, 1, 2)
    aa = F.interpolate(img, size=grid, mode="bicubic", align_corners=False, antialias=True)
    assert (ours[1:] - aa.permute(0, 2, 3, 1).reshape(-1, c)).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(96, 128), (32, 48)])
def test_other_crop_sizes_match_a_model_with_the_resized_embedding(
    size: tuple[int, int], maskclip: OpenClipDense
) -> None:
    # A model built natively at the other size, holding the reference-resized positional
    # embedding, must give the same embeddings as our on-the-fly interpolation.
    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "image_size": size}}
    resized = open_clip.CLIP(**cfg, quick_gelu=True)
    sd = maskclip.model.state_dict()
    grid = (size[0] // 16, size[1] // 16)
    key = "visual.positional_embedding"
    sd[key] = _reference_resize(sd[key], (4, 4), grid)
    resized.load_state_dict(sd)
    crops = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        maskclip.crop_embeddings(crops),
        resized.encode_image(crops, normalize=True),
        atol=1e-5,
        rtol=1e-4,
    )


def test_dense_at_other_crop_sizes(maskclip: OpenClipDense) -> None:
    cls, dense = maskclip.crops_and_dense(torch.randn(3, 3, 96, 128))
    assert cls.shape == (3, 32) and dense.shape == (3, 32, 6, 8)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        maskclip.dense_features(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) float"):
        maskclip.dense_features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_text_embeddings_are_template_averaged_and_normalised(maskclip: OpenClipDense) -> None:
    names, templates = ["cat", "traffic light"], ("a photo of a {}.", "a {} in the wild")
    got = maskclip.encode_text(names, templates)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    tok = open_clip.get_tokenizer("ViT-B-16")
    per = torch.stack(
        [
            maskclip.model.encode_text(tok([t.format(n) for t in templates]), normalize=True)
            for n in names
        ]
    )
    torch.testing.assert_close(got, F.normalize(per.mean(1), dim=-1), atol=1e-6, rtol=1e-5)
    single = maskclip.encode_text(["cat"], templates[:1])
    torch.testing.assert_close(single[0], per[0, 0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="placeholder"):
        maskclip.encode_text(["cat"], ("a photo",))
    with pytest.raises(ValueError, match="non-empty list of str"):
        maskclip.encode_text("cat", templates)  # type: ignore[arg-type]


def test_unsupported_variants_are_rejected() -> None:
    cfg = {
        **TINY_CLIP_CFG,
        "vision_cfg": {
            **TINY_CLIP_CFG["vision_cfg"],
            "attentional_pool": True,
            "attn_pooler_heads": 2,
            "attn_pooler_queries": 4,
        },
    }
    model = open_clip.CLIP(**cfg)
    with pytest.raises(UnsupportedModelError, match="attentional pooler"):
        OpenClipDense(model, None, "pooled")
    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "qk_norm": True}}
    with pytest.raises(UnsupportedModelError, match="custom attention"):
        OpenClipDense(open_clip.CLIP(**cfg), None, "qknorm")
    with pytest.raises(ValueError, match="mode 'dense'"):
        build_model("clip_tiny", None, mode="dense")


def test_random_init_is_deterministic_and_checkpoint_reloads(
    tmp_path: Path, maskclip: OpenClipDense
) -> None:
    again = build_model("clip_tiny", None)
    crops = _crops()
    torch.testing.assert_close(again.dense_features(crops), maskclip.dense_features(crops))
    other = build_model("clip_tiny", None, seed=1)
    assert not torch.allclose(other.crop_embeddings(crops), maskclip.crop_embeddings(crops))
    path = tmp_path / "clip_tiny.pt"
    torch.save(maskclip.model.state_dict(), path)
    loaded = build_model("clip_tiny", str(path), seed=1)
    torch.testing.assert_close(loaded.crop_embeddings(crops), maskclip.crop_embeddings(crops))
    sd = maskclip.model.state_dict()
    sd.pop("visual.proj")
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: visual\.proj"):
        build_model("clip_tiny", str(path))


def test_offline_tag_and_missing_file_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("clip_vit_l14_336", "openai", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "'openai'" in msg and "vit_large_patch14_clip_336.openai" in msg
    assert "--set models.clip_weights=s3://bucket/" in msg
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("clip_vit_b16", "no_such_file.safetensors", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "no_such_file.safetensors" in msg and "laion2b_s34b_b88k" in msg  # tags listed


def test_precision_is_fp32_on_cpu() -> None:
    clip = build_model("clip_tiny", None, "cpu", precision="bf16")
    assert clip.dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp8'"):
        build_model("clip_tiny", None, precision="fp8")


@pytest.mark.parametrize("mode", ["maskclip", "sclip"])
def test_the_autocast_path_runs_under_cpu_bf16_autocast_and_matches_fp32(mode) -> None:
    # The CUDA path (autocast + float32 outputs) is device-generic: run it under CPU
    # autocast, so a dtype mix-up in it fails here, without a GPU. 96 px crops also take
    # the positional-embedding interpolation under autocast.
    fp32 = build_model("clip_tiny", None, "cpu", mode=mode)
    bf16 = build_model("clip_tiny", None, "cpu", mode=mode)
    bf16.dtype = torch.bfloat16  # what precision="auto" sets on CUDA
    crops = _crops(3, size=96)
    (c32, d32), (c16, d16) = fp32.crops_and_dense(crops), bf16.crops_and_dense(crops)
    assert c16.dtype == d16.dtype == torch.float32 and d16.shape == d32.shape == (3, 32, 6, 6)
    assert F.cosine_similarity(c16, c32, dim=-1).min() > 0.98
    assert F.cosine_similarity(d16, d32, dim=1).min() > 0.95
    assert not torch.equal(d16, d32)  # bf16 did run: the numbers differ a little
    t32 = fp32.encode_text(["cat", "dog"], ("a photo of a {}.",))
    t16 = bf16.encode_text(["cat", "dog"], ("a photo of a {}.",))
    assert t16.dtype == torch.float32 and F.cosine_similarity(t16, t32, dim=-1).min() > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda_matches_fp32() -> None:
    fp32 = build_model("clip_tiny", None, "cuda", precision="fp32")
    bf16 = build_model("clip_tiny", None, "cuda", precision="auto")
    assert bf16.dtype == torch.bfloat16
    crops = _crops(4).cuda()
    (c32, d32), (c16, d16) = fp32.crops_and_dense(crops), bf16.crops_and_dense(crops)
    assert c16.dtype == d16.dtype == torch.float32 and d16.device.type == "cuda"
    assert F.cosine_similarity(c16, c32, dim=-1).min() > 0.99
    assert F.cosine_similarity(d16, d32, dim=1).min() > 0.98
    t32 = fp32.encode_text(["cat", "dog"], ("a photo of a {}.",))
    t16 = bf16.encode_text(["cat", "dog"], ("a photo of a {}.",))
    assert F.cosine_similarity(t16, t32, dim=-1).min() > 0.99
