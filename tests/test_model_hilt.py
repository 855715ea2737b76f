"""HILT connector against a hand-written fp64 formula, the ViT's position embeddings, and the
visual token counts of HILT and its ablations."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hilt_scale.model.attention import hilt_attention
from hilt_scale.model.config import ConnectorConfig, VisionConfig, model_config
from hilt_scale.model.connectors import HiltConnector, build_connector
from hilt_scale.model.visual import build_vision
from hilt_scale.model.vit3d import ViT3D, patchify


def paper_formula_fp64(q, k, scale, fc1, fc2):
    """Z = F(Q + softmax(Q K^T * s) K) with F = fc2(gelu(fc1(.))), written out in float64."""
    q, k = q.double(), k.double()
    scores = torch.einsum("bnc,bmc->bnm", q, k) * scale
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    h = q + torch.einsum("bnm,bmc->bnc", weights, k)
    h = h @ fc1.weight.double().T + fc1.bias.double()
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ fc2.weight.double().T + fc2.bias.double()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("attn_scale", ["rsqrt", "paper"])
def test_hilt_connector_equals_fp64_paper_formula(impl, attn_scale):
    torch.manual_seed(0)
    width = 48
    conn = HiltConnector(ConnectorConfig(attn_impl=impl, attn_scale=attn_scale), width, 32).double()
    z_hr = torch.randn(2, 27, width, dtype=torch.float64) * 0.3
    z_lr = torch.randn(2, 5, width, dtype=torch.float64) * 0.3
    out = conn(z_hr, z_lr, (3, 3, 3))
    scale = 1.0 if attn_scale == "paper" else 1 / math.sqrt(width)
    want = paper_formula_fp64(z_lr, z_hr, scale, conn.projector.fc1, conn.projector.fc2)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_hilt_connector_float32_close_to_fp64():
    torch.manual_seed(1)
    conn = HiltConnector(ConnectorConfig(), 64, 16)
    z_hr, z_lr = torch.randn(1, 40, 64), torch.randn(1, 8, 64)
    want = paper_formula_fp64(z_lr, z_hr, 1 / 8, conn.projector.fc1, conn.projector.fc2)
    torch.testing.assert_close(conn(z_hr, z_lr, (2, 4, 5)).double(), want, rtol=1e-4, atol=1e-5)


def test_triton_falls_back_to_sdpa_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("fallback path is for machines without CUDA")
    q, kv = torch.randn(1, 4, 8), torch.randn(1, 10, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hilt_attention(q, kv, 0.5, "triton")
    torch.testing.assert_close(out, hilt_attention(q, kv, 0.5, "eager"))
    assert any("Triton" in str(w.message) for w in caught)


def test_lr_position_embeddings_are_the_trilinear_resize_of_the_hr_table():
    vit = ViT3D(VisionConfig(width=8, depth=1, heads=2), (2, 4, 4), (4, 4, 4))
    torch.nn.init.normal_(vit.pos_embed)
    assert vit.pos_embed_for((4, 4, 4)) is vit.pos_embed
    table = vit.pos_embed.detach().transpose(1, 2).reshape(1, 8, 4, 4, 4)
    # Halving each axis with align_corners=False samples midway between voxel pairs: a 2x2x2 mean.
    want = F.avg_pool3d(table, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(vit.pos_embed_for((2, 2, 2)), want)


def test_vit_rejects_volume_not_multiple_of_patch():
    vit = ViT3D(VisionConfig(width=8, depth=1, heads=2), (2, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="patch size"):
        vit(torch.zeros(1, 1, 8, 8, 10))


def test_patch_embedding_equals_strided_conv3d():
    """The linear patch embedding is a Conv3d with kernel = stride = patch, token order (d, h, w)."""
    torch.manual_seed(0)
    patch = (2, 4, 3)
    vit = ViT3D(VisionConfig(width=5, depth=1, heads=1), patch, (3, 2, 4)).double()
    volume = torch.randn(2, 1, 6, 8, 12, dtype=torch.float64)
    weight = vit.patch_embed.weight.reshape(5, 1, *patch)
    want = F.conv3d(volume, weight, vit.patch_embed.bias, stride=patch).flatten(2).transpose(1, 2)
    got = vit.patch_embed(patchify(volume, patch))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_vit_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = VisionConfig(width=16, depth=2, heads=2)
    a = ViT3D(cfg, (2, 4, 4), (2, 2, 2))
    b = ViT3D(VisionConfig(width=16, depth=2, heads=2, grad_checkpointing=True), (2, 4, 4), (2, 2, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 4, 8, 8)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    torch.testing.assert_close(a.pos_embed.grad, b.pos_embed.grad)


def _visual_tokens(connector: str, hr_size, resolution="paper", **conn) -> tuple[int, int]:
    """Run vision + connector on the meta device (no memory, no compute) for real paper sizes."""
    cfg = model_config(vision="vit-micro", connector=connector, resolution=resolution)
    for k, v in conn.items():
        setattr(cfg.connector, k, v)
    with torch.device("meta"):
        vision = build_vision(cfg)
        conn_mod = build_connector(cfg.connector, cfg.vision.width, 32)
        x = torch.empty(1, 1, *hr_size)
        lr = F.interpolate(x, size=cfg.resolution.lr_size, mode="trilinear")
        z_lr = vision(lr) if conn_mod.needs_lr else None
        z_hr = vision(x) if conn_mod.needs_hr else None
        hr_grid = vision.grid_of(hr_size) if conn_mod.needs_hr else None
        tokens = conn_mod(z_hr, z_lr, hr_grid)
    return tokens.shape[1], tokens.shape[2]


def test_hilt_gives_64_tokens_whatever_the_hr_size():
    # HR 512x512x256 and 256x256x128 (H x W x D), LR 128x128x64, patch 32x32x16.
    assert _visual_tokens("hilt", (256, 512, 512)) == (64, 32)
    assert _visual_tokens("hilt", (128, 256, 256)) == (64, 32)


def test_all_tokens_grows_with_hr_size():
    assert _visual_tokens("all-tokens", (256, 512, 512))[0] == 4096
    assert _visual_tokens("all-tokens", (128, 256, 256))[0] == 512


def test_other_ablations_token_counts():
    assert _visual_tokens("random-queries", (256, 512, 512), num_queries=32)[0] == 32
    assert _visual_tokens("pooled", (256, 512, 512), pool_grid=(2, 4, 4))[0] == 32


def test_2d_baseline_is_the_hr_volume_as_a_multichannel_image():
    # The paper's 2D row: all HR slices as channels, 16x16 patches over H x W:
    # 512x512x256 -> 32*32 = 1024 tokens, 256x256x128 -> 16*16 = 256 tokens.
    assert _visual_tokens("2d", (256, 512, 512))[0] == 1024
    assert _visual_tokens("2d", (128, 256, 256), resolution="normal")[0] == 256
    cfg = model_config(vision="vit-micro", connector="2d", resolution="normal")
    assert build_vision(cfg).patch_size == (128, 16, 16)
    # Each token sees one 16x16 column through every slice: changing one slice inside the
    # first column changes the first token only.
    cfg = model_config(
        vision="vit-micro", connector="2d", resolution="cpu-micro", overrides={"vision.depth": "0"}
    )
    vit = build_vision(cfg)
    x = torch.zeros(1, 1, 16, 32, 32)
    y = x.clone()
    y[0, 0, 11, :16, :16] = 1.0
    changed = (
        vit.patch_embed(patchify(x, vit.patch_size)) != vit.patch_embed(patchify(y, vit.patch_size))
    ).any(-1)
    assert changed.tolist() == [[True, False, False, False]]


def test_2d_patch_must_divide_the_hr_plane():
    with pytest.raises(ValueError, match="connector.patch_2d=24 must divide"):
        model_config(connector="2d", resolution="normal", overrides={"connector.patch_2d": "24"})


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_projector_layers_set_the_depth_of_f(layers):
    cfg = model_config(overrides={"connector.projector_layers": str(layers)})
    conn = build_connector(cfg.connector, 16, 8)
    linears = [m for m in conn.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    want = x
    for i, lin in enumerate(linears):
        want = lin(F.gelu(want) if i else want)
    torch.testing.assert_close(conn.projector(x), want)
    assert conn.projector(x).shape == (2, 5, 8)


@pytest.mark.parametrize("layers", ["0", "4"])
def test_projector_layers_outside_1_to_3_is_an_error(layers):
    with pytest.raises(ValueError, match=f"connector.projector_layers={layers}; expected 1, 2 or 3"):
        model_config(overrides={"connector.projector_layers": layers})


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_implementations_agree_with_the_kernel_reference(impl):
    from hilt_kernels.reference import hilt_attention_reference

    torch.manual_seed(2)
    q, kv = torch.randn(2, 6, 32), torch.randn(2, 50, 32)
    for scale in (1.0, 32**-0.5):
        want = hilt_attention_reference(q, kv, kv, scale=scale)
        torch.testing.assert_close(hilt_attention(q, kv, scale, impl), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_multi_head_hilt_equals_per_head_fp64_formula(impl):
    torch.manual_seed(3)
    width, heads = 24, 3
    conn = HiltConnector(ConnectorConfig(attn_impl=impl, heads=heads), width, 16).double()
    z_hr, z_lr = torch.randn(2, 20, width, dtype=torch.float64), torch.randn(2, 4, width, dtype=torch.float64)
    d = width // heads
    h = torch.cat(
        [
            z_lr[..., i * d : (i + 1) * d]
            + torch.softmax(
                z_lr[..., i * d : (i + 1) * d] @ z_hr[..., i * d : (i + 1) * d].transpose(1, 2) / d**0.5, -1
            )
            @ z_hr[..., i * d : (i + 1) * d]
            for i in range(heads)
        ],
        dim=-1,
    )
    want = conn.projector(h)
    torch.testing.assert_close(conn(z_hr, z_lr, (2, 2, 5)), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="connector.heads"):
        HiltConnector(ConnectorConfig(heads=5), width, 16)


def test_footprint_keys_read_only_the_hr_tokens_under_their_own_lr_patch():
    """connector.keys=footprint: each LR query mixes the 8 HR tokens of its own patch (factor 2);
    an HR token elsewhere cannot change it. The block-local computation equals the global formula
    with the footprint mask (fp64, written here), forward and backward, with 1 and 2 heads."""
    from hilt_scale.model.attention import attention_entropy, footprint_attention, footprint_mask

    mask = footprint_mask((4, 6, 2), 6)  # LR grid (2, 3, 1)
    assert mask.shape == (6, 48) and mask.sum(1).tolist() == [8] * 6 and mask.sum(0).tolist() == [1] * 48
    # HR token (d, h, w) = (3, 5, 1) sits in LR patch (1, 2, 0) = LR index 1*3 + 2 = 5.
    assert mask[5, (3 * 6 + 5) * 2 + 1] and not mask[0, (3 * 6 + 5) * 2 + 1]

    def masked(q, kv, scale, heads):  # the paper's formula over all keys, other patches masked out
        b, n, c = q.shape
        qh, kh = (x.view(b, -1, heads, c // heads).transpose(1, 2) for x in (q, kv))
        logits = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        return q + (torch.softmax(logits, -1) @ kh).transpose(1, 2).reshape(b, n, c)

    torch.manual_seed(0)
    for heads in (1, 2):
        q = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(2, 48, 16, dtype=torch.float64, requires_grad=True)
        want = masked(q, kv, 0.25, heads)
        got = footprint_attention(q, kv, (4, 6, 2), 0.25, heads)
        assert ((got - q) - (want - q)).norm() / (want - q).norm() < 1e-12  # the attention term
        g = torch.randn_like(want)
        gw = torch.autograd.grad(want, (q, kv), g)
        gg = torch.autograd.grad(got, (q, kv), g)
        for a, b in zip(gg, gw):
            assert (a - b).norm() / b.norm() < 1e-12
    out = footprint_attention(q.detach(), kv.detach(), (4, 6, 2), 0.25)
    moved = kv.detach().clone()
    moved[:, (3 * 6 + 5) * 2 + 1] += 10.0  # an HR token in LR patch 5 only
    again = footprint_attention(q.detach(), moved, (4, 6, 2), 0.25)
    changed = (again - out).abs().amax(-1)[0]
    assert changed[5] > 0 and changed[:5].max() == 0
    assert attention_entropy(q.detach(), kv.detach(), 0.25, mask=mask) <= torch.log(torch.tensor(8.0)) + 1e-6
    with pytest.raises(ValueError, match="isotropic"):
        footprint_mask((4, 6, 3), 6)
    with pytest.raises(ValueError, match="isotropic"):
        footprint_attention(q, torch.randn(2, 72, 16, dtype=torch.float64), (4, 6, 3), 0.25)


def test_footprint_keys_need_hilt_and_build_a_model():
    with pytest.raises(ValueError, match="footprint needs LR queries.*set connector.keys=global"):
        model_config(connector="random-queries", resolution="cpu-micro", overrides={"connector.keys": "footprint"})
    for kind in ("lr-only", "all-tokens", "pooled", "2d"):  # no attention: the keys are unused
        model_config(connector=kind, resolution="cpu-micro", overrides={"connector.keys": "footprint"})
    cfg = model_config(connector="hilt", resolution="cpu-micro", overrides={"connector.keys": "footprint"})
    from hilt_scale.model.visual import encode_volumes

    torch.manual_seed(0)
    vision = build_vision(cfg)
    local = build_connector(cfg.connector, cfg.vision.width, 32)
    wide = build_connector(dataclasses.replace(cfg.connector, keys="global"), cfg.vision.width, 32)
    wide.load_state_dict(local.state_dict())
    hr = torch.randint(0, 255, (2, 1, *cfg.resolution.hr_size), dtype=torch.uint8)
    res = cfg.resolution
    tokens = encode_volumes(vision, local, res.lr_size, hr)
    assert tokens.shape == (2, math.prod(vision.grid_of(res.lr_size)), 32)
    assert not torch.allclose(tokens, encode_volumes(vision, wide, res.lr_size, hr))
