"""Encoder and attention options of issue 22: the local-contrast input, the conv stem, the final
LayerNorm choice, the learned attention temperature, the LR view, and the LR factor the phantom's
physics labels are computed at."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hilt_scale.model.attention import attention_entropy, hilt_attention
from hilt_scale.model.config import ConnectorConfig, VisionConfig, lr_factor, model_config, preset
from hilt_scale.model.connectors import HiltConnector, make_projector
from hilt_scale.model.visual import build_vision, encode_volumes, lr_view
from hilt_scale.model.vit3d import ViT3D, input_channels, local_contrast
from shards.phantom_report import HR_ONLY_KINDS

CONV = dict(input="window+contrast", stem="conv", final_norm=False)


def test_local_contrast_is_zero_on_a_constant_volume_and_keeps_absolute_intensity():
    flat = torch.full((2, 1, 6, 10, 10), 0.3) * 2 - 1
    x = input_channels(flat, "window+contrast")
    assert x.shape == (2, 2, 6, 10, 10)
    assert torch.equal(x[:, :1], flat) and x[:, 1].abs().max() < 1e-5
    # A spot on two background levels: the same local contrast, but the first channel tells the levels apart.
    spots = []
    for level in (0.2, 0.6):
        v = torch.full((1, 1, 6, 10, 10), level)
        v[0, 0, 3, 5, 5] += 0.1
        spots.append(input_channels(v * 2 - 1, "window+contrast"))
    assert torch.allclose(spots[0][:, 1], spots[1][:, 1], atol=1e-4)
    want = (0.1 - 0.1 / 75) / (0.1 * math.sqrt(1 / 75 - 1 / 75**2) + 0.05)  # (spot - mean) / (std + 0.05)
    assert spots[0][0, 1, 3, 5, 5].item() == pytest.approx(want, rel=1e-4)
    assert not torch.allclose(spots[0][:, 0], spots[1][:, 0])
    assert torch.equal(input_channels(flat, "window"), flat)


def test_local_contrast_uses_the_3x5x5_neighbourhood():
    v = torch.zeros(1, 1, 5, 9, 9)
    v[0, 0, 2, 4, 4] = 1.0
    c = local_contrast(v)
    # Inside the 3x5x5 window of the spot the mean is 1/75, outside it nothing is seen.
    mean, std = 1 / 75, math.sqrt(1 / 75 - 1 / 75**2)
    assert c[0, 0, 2, 4, 4].item() == pytest.approx((1 - mean) / (std + 0.05), rel=1e-4)
    assert abs(c[0, 0, 2, 4, 7].item()) < 1e-6  # 3 away in W: outside the window
    assert c[0, 0, 3, 4, 4].item() == pytest.approx(-mean / (std + 0.05), rel=1e-4)  # 1 away in D: inside


def _spot_token_change(cfg: VisionConfig, seed: int) -> float:
    """How much the token of the patch holding one faint voxel (+0.15 on lung, one of 256 voxels)
    changes, relative to a token's norm, at initialisation."""
    torch.manual_seed(seed)
    vit = ViT3D(cfg, (4, 8, 8), (4, 4, 4)).eval()
    g = torch.Generator().manual_seed(100 + seed)
    base = -0.7 + 0.01 * torch.randn(1, 1, 16, 32, 32, generator=g)
    base[..., 16:] = 0.1  # an anatomy edge (lung | soft tissue)
    spot = base.clone()
    spot[0, 0, 6, 12, 11] += 0.15
    with torch.no_grad():
        a, b = vit(base), vit(spot)
    token = 1 * 16 + 1 * 4 + 1  # patch (1, 1, 1) holds the voxel
    return ((b - a)[0, token].norm() / a[0].norm(dim=-1).mean()).item()


def test_conv_stem_keeps_a_one_voxel_signal_the_paper_patch_embedding_dilutes():
    paper = VisionConfig(width=32, depth=1, heads=2)
    conv = VisionConfig(width=32, depth=1, heads=2, **CONV)
    for seed in range(3):
        assert _spot_token_change(conv, seed) > 3 * _spot_token_change(paper, seed)


def test_conv_stem_is_conv_relu_then_the_max_of_each_patch():
    """The stem takes the max before the ReLU, on channels-last memory: the same values and
    gradients as the plain conv -> ReLU -> max over each patch (odd patch, two channels, fp64)."""
    from hilt_scale.model.vit3d import ConvStem

    torch.manual_seed(3)
    stem = ConvStem(2, 5, (3, 2, 5)).double()
    with torch.no_grad():
        stem.conv.bias[:2] -= 2.0  # some patches' maxima below 0: the ReLU's zeros
    x = torch.randn(2, 2, 6, 4, 15, dtype=torch.float64)
    ref = F.max_pool3d(F.relu(stem.conv(x)), (3, 2, 5)).flatten(2).transpose(1, 2)
    w = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), stem.conv.weight)
    out = stem(x)
    (grad,) = torch.autograd.grad((out * w).sum(), stem.conv.weight)
    assert out.shape == (2, 2 * 2 * 3, 5) and (out == 0).any() and (out > 0).any()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12) and torch.allclose(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_final_norm_equalises_token_norms_and_its_removal_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 16, 16)
    x[:, :, 2, 5, 5] += 3.0
    normed = ViT3D(VisionConfig(width=16, depth=1, heads=2), (4, 8, 8), (2, 2, 2))
    free = ViT3D(VisionConfig(width=16, depth=1, heads=2, final_norm=False), (4, 8, 8), (2, 2, 2))
    free.load_state_dict({k: v for k, v in normed.state_dict().items() if not k.startswith("norm.")})
    norms = normed(x).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 4.0), atol=1e-3)  # sqrt(width), unit gain
    assert free(x).norm(dim=-1).std() > 0.1
    assert isinstance(free.norm, torch.nn.Identity)


def test_conv_stem_vit_builds_from_the_preset_and_trains_its_stem():
    cfg = model_config(vision="vit-micro-conv", resolution="cpu-micro")
    assert (cfg.vision.stem, cfg.vision.input, cfg.vision.final_norm) == ("conv", "window+contrast", False)
    assert preset("vision", "vit-micro").stem == "patch"  # the paper's ViT stays as it was
    vit = build_vision(cfg)
    assert vit.stem.conv.in_channels == 2 and vit.patch_embed.in_features == 16
    out = vit(torch.rand(2, 1, *cfg.resolution.hr_size) * 2 - 1)
    assert out.shape == (2, 64, cfg.vision.width)
    out.sum().backward()
    assert vit.stem.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vision.stem"):
        model_config(resolution="cpu-micro", overrides=["vision.stem=resnet"])
    with pytest.raises(ValueError, match="vision.input"):
        model_config(resolution="cpu-micro", overrides=["vision.input=contrast"])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_learned_temperature_is_the_scale_of_the_paper_formula_and_trains(impl):
    torch.manual_seed(0)
    width = 16
    conn = HiltConnector(ConnectorConfig(attn_scale="learned", attn_impl=impl), width, 8)
    assert conn.log_scale.item() == pytest.approx(math.log(1 / math.sqrt(width)))
    assert any(p is conn.log_scale for p in conn.parameters())
    with torch.no_grad():
        conn.log_scale.fill_(math.log(0.7))
    q, kv = torch.randn(2, 4, width), torch.randn(2, 12, width)
    attn = torch.softmax(q @ kv.transpose(1, 2) * 0.7, dim=-1)
    want = conn.projector(q + attn @ kv)
    assert torch.allclose(conn(kv, q, (2, 2, 3)), want, atol=1e-5)
    assert torch.allclose(
        hilt_attention(q, kv, torch.tensor(0.7), impl), hilt_attention(q, kv, 0.7, impl), atol=1e-5
    )
    opt = torch.optim.SGD([conn.log_scale], lr=0.5)
    conn(kv, q, (2, 2, 3)).pow(2).sum().backward()
    assert conn.log_scale.grad is not None and conn.log_scale.grad.abs() > 0
    opt.step()
    assert conn.log_scale.item() != pytest.approx(math.log(0.7))


def test_attention_entropy_is_log_n_when_uniform_and_falls_when_sharp():
    q, kv = torch.zeros(1, 3, 8), torch.randn(1, 10, 8)
    assert attention_entropy(q, kv, 1.0).item() == pytest.approx(math.log(10), rel=1e-5)
    q = torch.randn(1, 3, 8)
    assert attention_entropy(q, kv, 10.0) < attention_entropy(q, kv, 0.1)
    conn = HiltConnector(ConnectorConfig(), 8, 4)
    conn.record_entropy = True
    conn(kv, q, (1, 2, 5))
    assert conn.last_entropy == pytest.approx(attention_entropy(q, kv, 1 / math.sqrt(8)).item())


def test_area_lr_view_is_average_pooling_and_trilinear_aliases_at_factor_4():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 32, 32)
    for factor in (2, 4):
        size = (16 // factor, 32 // factor, 32 // factor)
        assert torch.allclose(lr_view(x, size, "area"), F.avg_pool3d(x, factor), atol=1e-6)
    assert torch.allclose(lr_view(x, (8, 16, 16), "trilinear"), F.avg_pool3d(x, 2), atol=1e-5)
    # At 4x trilinear reads 2 of 4 voxels per axis: a one-voxel spot keeps 0 or 1/8 of its
    # contrast by where it sits, the area view always 1/64.
    kept = {}
    for mode in ("area", "trilinear"):
        for offset in (0, 1):
            v = torch.zeros(1, 1, 16, 32, 32)
            v[0, 0, 8 + offset, 16 + offset, 16 + offset] = 1.0
            kept[mode, offset] = lr_view(v, (4, 8, 8), mode).max().item()
    assert kept["area", 0] == pytest.approx(1 / 64) and kept["area", 1] == pytest.approx(1 / 64)
    assert kept["trilinear", 0] == 0.0 and kept["trilinear", 1] == pytest.approx(1 / 8)


def test_the_model_encodes_its_lr_view_as_configured():
    cfg = model_config(vision="vit-micro-conv", connector="lr-only", resolution="cpu-micro")
    cfg = dataclasses.replace(cfg, resolution=dataclasses.replace(cfg.resolution, lr_size=(4, 8, 8)))
    torch.manual_seed(0)
    vit = build_vision(cfg)
    from hilt_scale.model.connectors import build_connector

    conn = build_connector(cfg.connector, cfg.vision.width, 8)
    hr = torch.randint(-1000, 200, (1, 1, 16, 32, 32), dtype=torch.int16)
    with torch.no_grad():
        area = encode_volumes(vit, conn, (4, 8, 8), hr, "area")
        tri = encode_volumes(vit, conn, (4, 8, 8), hr, "trilinear")
        hu_lr = F.avg_pool3d(hr.float(), 4).round()  # HU volumes: resized in HU, then windowed
        want = conn(None, vit((hu_lr.clamp(-1000, 200) + 1000) / 1200 * 2 - 1), (0, 0, 0))
    assert torch.allclose(area, want, atol=1e-5) and not torch.allclose(area, tri, atol=1e-3)


def test_lr_factor_of_a_resolution():
    assert lr_factor(preset("resolution", "cpu-tiny")) == 2
    assert lr_factor(preset("resolution", "paper")) == 4
    assert lr_factor(preset("resolution", "cpu-tiny"), (64, 128, 128)) == 4
    with pytest.raises(ValueError, match="integer factor"):
        lr_factor(dataclasses.replace(preset("resolution", "cpu-tiny"), lr_size=(16, 16, 16)))


def test_the_trainer_labels_its_phantom_at_the_lr_factor_it_uses(tmp_path):
    """cpu-micro HR with a 4x LR view: the embedded phantom's one-voxel findings fill 1/64 of an LR
    voxel (at the old fixed factor 2 they would fill 1/8)."""
    from hilt_scale.training.config import parse_args
    from hilt_scale.training.data import prepare_data
    from hilt_scale.training.loop import run_model_config
    from shards.read import open_shard_set

    argv = ["--resolution", "cpu-micro", "--set", "resolution.lr_size=4,8,8", "--phantom-n", "8"]
    cfg = parse_args([*argv, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    data, _ = prepare_data(cfg, run_model_config(cfg), rank=0, local_rank=0)
    assert "-lr4" in data
    shard_set = open_shard_set(data)
    fills = [
        f["lr_fill"]
        for split in ("train", "valid")
        for i, j in shard_set.entries(split)
        for f in shard_set.read(i, j)["meta"]["findings"]
        if f["kind"] in HR_ONLY_KINDS
    ]
    assert fills and all(v == 0.016 for v in fills), fills


def test_a_wider_hu_window_keeps_calcium_apart_from_soft_tissue():
    from hilt_scale.model.visual import to_unit_range

    hu = torch.tensor([[-1000, 40, 200, 800]], dtype=torch.int16)
    paper = to_unit_range(hu)
    assert paper[0, 2] == paper[0, 3] == 1.0  # 200 and 800 HU look the same: calcium clipped
    wide = to_unit_range(hu, (-1000.0, 1000.0))
    assert torch.allclose(wide, torch.tensor([[0.0, 0.52, 0.6, 0.9]]))
    cfg = model_config(resolution="cpu-micro", overrides=["vision.hu_window=-1000,1000"])
    assert cfg.vision.hu_window == (-1000.0, 1000.0)
    with pytest.raises(ValueError, match="int16"):
        to_unit_range(torch.zeros(1, 4, dtype=torch.uint8), (-1000.0, 1000.0))


def test_the_calcium_channel_keeps_a_calcium_voxel_that_the_paper_window_clips_and_lr_dilutes():
    """vision.input=window+contrast+calcium: the ViT gets (window, local contrast, HU in [130, 1000]),
    HR and LR alike. A one-voxel 800 HU spot beside 350 HU bone: the paper window makes them equal,
    the calcium channel keeps them apart at HR, and the LR view, which averages HU before the
    windows as a coarser scanner voxel does, leaves the spot at the calcium window's floor."""
    cfg = model_config(
        vision="vit-micro-conv", connector="hilt", resolution="cpu-micro",
        overrides=["vision.input=window+contrast+calcium"],
    )  # fmt: skip
    torch.manual_seed(0)
    vit = build_vision(cfg)
    # window + contrast share the stem's filters; the calcium channel has filters of its own
    assert vit.stem.conv.in_channels == 2 and vit.stem.calcium.in_channels == 1
    assert vit.patch_embed.in_features == cfg.vision.stem_channels + vit.stem.calcium.out_channels
    from hilt_scale.model.connectors import build_connector

    conn = build_connector(cfg.connector, cfg.vision.width, 8)
    hr = torch.full((1, 1, 16, 32, 32), 40, dtype=torch.int16)  # soft tissue
    hr[..., 20:] = 350  # bone
    hr[0, 0, 5, 6, 7] = 800  # one calcium voxel
    seen = []
    vit.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        encode_volumes(vit, conn, (8, 16, 16), hr)
    lr_in, hr_in = seen  # the connector needs the LR pass, then the HR pass
    calcium = (hr.float().clamp(130, 1000) - 130) / 870 * 2 - 1
    assert hr_in.shape == (1, 2, 16, 32, 32) and torch.equal(hr_in[:, 1:], calcium)
    assert hr_in[0, 0, 5, 6, 7] == hr_in[0, 0, 5, 6, 25] == 1.0  # the paper window: spot == bone
    assert hr_in[0, 1, 5, 6, 7] > hr_in[0, 1, 5, 6, 25] + 0.9  # the calcium channel: apart
    hu_lr = F.avg_pool3d(hr.float(), 2).round()  # the spot's LR voxel: (800 + 7 x 40) / 8 = 135 HU
    assert torch.allclose(lr_in[:, :1], (hu_lr.clamp(-1000, 200) + 1000) / 1200 * 2 - 1, atol=1e-6)
    assert torch.allclose(lr_in[:, 1:], (hu_lr.clamp(130, 1000) - 130) / 870 * 2 - 1, atol=1e-6)
    spot_lr = lr_in[0, 1, 2, 3, 3]
    assert spot_lr == pytest.approx(-1 + 2 * (135 - 130) / 870, abs=1e-6)  # at the window's floor
    # Windowing first would have kept 1/8 of the spot's 0.77 on a background of exactly 0.
    assert (spot_lr + 1) / 2 < (F.avg_pool3d(hr_in, 2)[0, 1, 2, 3, 3] + 1) / 2 / 15
    assert spot_lr < lr_in[0, 1, 2, 3, 12]  # below the bone's LR voxels
    x = input_channels(hr_in, cfg.vision.input)
    assert x.shape == (1, 3, 16, 32, 32)
    assert torch.equal(x[:, 0], hr_in[:, 0]) and torch.equal(x[:, 2], (hr_in[:, 1] + 1) / 2)  # calcium in [0, 1]
    assert torch.allclose(x[:, 1:2], local_contrast((hr_in[:, :1] + 1) / 2))
    with pytest.raises(ValueError, match="int16"):  # uint8 shards have lost the HU above the window
        encode_volumes(vit, conn, (8, 16, 16), torch.zeros(1, 1, 16, 32, 32, dtype=torch.uint8))


def test_the_calcium_highpass_silences_bones_plateau_keeps_a_spot_and_lr_still_dilutes_it():
    """vision.calcium=highpass: calcium in [0, 1] minus its 3x5x5 mean, times the gain. Checked
    against a plain fp64 loop over each voxel's neighbourhood (cut at the borders)."""
    import numpy as np

    from hilt_scale.model.config import CALCIUM_HIGHPASS_GAIN
    from hilt_scale.model.visual import to_unit_range

    hu = torch.full((1, 1, 8, 16, 16), 40, dtype=torch.int16)
    hu[..., 9:] = 350  # bone: a plateau at 0.25 of the calcium window
    hu[0, 0, 4, 5, 3] = 800  # a spot in soft tissue
    x = torch.cat([to_unit_range(hu) * 2 - 1, to_unit_range(hu, (130.0, 1000.0)) * 2 - 1], 1).double()
    got = input_channels(x, "window+contrast+calcium", "highpass")[0, 2].numpy()
    c = ((x[0, 1] + 1) / 2).numpy()

    def want(d, h, w):
        box = c[max(d - 1, 0) : d + 2, max(h - 2, 0) : h + 3, max(w - 2, 0) : w + 3]
        return CALCIUM_HIGHPASS_GAIN * (c[d, h, w] - box.mean())

    for idx in [(4, 5, 3), (4, 5, 4), (0, 0, 0), (4, 5, 9), (4, 5, 12), (7, 15, 15)]:
        assert got[idx] == pytest.approx(want(*idx), abs=1e-12), idx
    assert got[4, 5, 3] > 2.5  # the spot: (0.77 - 0.77 / 45) x 4 (its box is cut at w = 0)
    assert np.abs(got[:, :, 12:]).max() < 1e-12  # bone's interior: no signal (the window had 0.25)
    assert np.abs(got[:, :, 9:]).max() < got[4, 5, 3] / 4  # bone's edge: well below the spot
    # A linear map: in the LR view (the average of 8) the spot falls to ~1/8, as without it.
    lr = input_channels(F.avg_pool3d(x, 2), "window+contrast+calcium", "highpass")[0, 2]
    assert lr[2, 2, 1] < got[4, 5, 3] / 6
    # The default keeps the plain window, and a misspelt mode is an error naming the key.
    assert torch.equal(input_channels(x, "window+contrast+calcium")[:, 2:], (x[:, 1:] + 1) / 2)
    with pytest.raises(ValueError, match="vision.calcium"):
        model_config(resolution="cpu-micro", overrides=["vision.calcium=hipass"])


def test_the_calcium_filters_see_the_calcium_channel_alone_and_the_others_never_see_it():
    from hilt_scale.model.vit3d import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(3, 5, (2, 4, 4), calcium_channels=3).double()
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 2] = torch.rand(2, 4, 8, 8, dtype=torch.float64)  # another calcium channel
    z = x.clone()
    z[:, :2] = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)  # other window / contrast channels
    out, out_y, out_z = stem(x), stem(y), stem(z)
    assert out.shape == (2, 2 * 2 * 2, 5 + 3)
    assert torch.equal(out[..., :5], out_y[..., :5]) and not torch.equal(out[..., 5:], out_y[..., 5:])
    assert torch.equal(out[..., 5:], out_z[..., 5:]) and not torch.equal(out[..., :5], out_z[..., :5])
    ref = F.max_pool3d(F.relu(stem.calcium(x[:, 2:])), (2, 4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[..., 5:], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", [False, True])
def test_projector_norm_gives_the_llm_tokens_of_one_scale_whatever_the_encoders(norm):
    """Without the ViT's final LayerNorm token norms grow; connector.projector_norm normalises the
    projector's input, so scaling the tokens leaves the LLM's visual tokens unchanged."""
    torch.manual_seed(0)
    projector = make_projector(ConnectorConfig(projector_norm=norm), 16, 24)
    z = torch.randn(2, 3, 16) + 0.5
    assert torch.allclose(projector(z), projector(8 * z), atol=1e-4) is norm
    assert (
        isinstance(HiltConnector(ConnectorConfig(projector_norm=norm), 16, 24).projector.norm, nn.LayerNorm)
        is norm
    )
