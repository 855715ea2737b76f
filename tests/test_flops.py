"""Model FLOPs of a training step (hilt_scale.training.flops) against a direct count:
torch's FlopCounterMode on the real forward + backward of tiny models, per part."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hilt_scale.model.config import model_config
from hilt_scale.model.mllm import build_model, build_tokenizer
from hilt_scale.training import flops

REPORTS = [
    "Findings: The heart is normal in size. No pleural effusion.",
    "Findings: Mild emphysema in both lungs. Small lung nodule in the right upper lobe.",
    "Findings: Bilateral pleural effusion with atelectasis. Cardiomegaly is present.",
]


def _measured(model, batch, train: bool) -> dict[str, int]:
    """FLOPs that FlopCounterMode sees: the forward by top-level part, or forward + backward in all.

    Per part only for the forward: in the backward FlopCounterMode attributes ops to modules
    loosely. The math SDPA backend runs attention as bmm, which FlopCounterMode counts (the fused
    CPU kernel is not counted by it).
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if train:
            model(batch).backward()
        else:
            with torch.no_grad():
                model(batch)
    by_module = counter.get_flop_counts()
    return {
        part: sum(by_module.get(f"HiltReportModel.{part}", {}).values())
        for part in ("vision", "connector", "llm")
    } | {"total": counter.get_total_flops()}


@pytest.mark.parametrize(
    ("connector", "llm", "overrides"),
    [
        ("hilt", "llm-micro", {}),
        ("hilt", "llm-tiny", {"llm.num_kv_heads": "2", "connector.heads": "2", "vision.depth": "1"}),
        ("all-tokens", "llm-micro", {"connector.projector_layers": "3", "connector.projector_hidden": "48"}),
        ("random-queries", "llm-micro", {"connector.num_queries": "5", "llm.lora": "false"}),
        ("pooled", "llm-micro", {"connector.pool_grid": "2,2,2"}),
        ("lr-only", "llm-micro", {}),
        ("2d", "llm-micro", {"connector.patch_2d": "8"}),
        # The main job's encoder and losses: conv stem on two input channels, the finding head,
        # the connector's second pass for the LLM.
        ("hilt", "llm-micro", {"vision.input": "window+contrast", "vision.stem": "conv",
                               "findings_loss": "1.0", "vision_lm_grad": "false"}),
        ("lr-only", "llm-micro", {"vision.stem": "conv", "vision.stem_channels": "5", "findings_loss": "0.5"}),
        # The main job: footprint keys (block-local attention) and the finding tokens in the LLM.
        ("hilt", "llm-micro", {"vision.input": "window+contrast", "vision.stem": "conv", "connector.keys": "footprint",
                               "findings_loss": "1.0", "vision_lm_grad": "false", "finding_tokens": "teacher"}),
        # Three input channels (the calcium window).
        ("hilt", "llm-micro", {"vision.input": "window+contrast+calcium", "vision.stem": "conv"}),
    ],
)
def test_step_flops_match_flop_counter_on_the_real_forward_and_backward(connector, llm, overrides) -> None:
    cfg = model_config(connector=connector, llm=llm, resolution="cpu-micro", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg, build_tokenizer(cfg, texts=REPORTS * 10))
    model.train()
    hr = torch.randint(-1000, 1000, (3, 1, *cfg.resolution.hr_size), dtype=torch.int16)  # HU
    batch = model.collator()({"key": ["a", "b", "c"], "hr": hr, "report": REPORTS, "meta": [{}] * 3})
    shape = flops.llm_shape(model.llm.config, cfg)
    text_len = batch["input_ids"].shape[1]
    # Forward, part by part.
    forward = _measured(model, batch, train=False)
    tok = flops.vision_tokens(cfg)
    vit = sum(sum(flops.vit_pass(cfg, n, tok["patch_voxels"]).values()) for n in (tok["hr"], tok["lr"]) if n)
    assert 3 * vit == forward["vision"]
    passes = 1 if cfg.vision_lm_grad else 2  # vision_lm_grad=false: a second pass for the LLM
    conn = flops.connector_pass(cfg, shape.hidden)
    assert 3 * passes * (conn["attention"] + conn["projector"]) == forward["connector"]
    assert sum(flops.llm_pass(shape, 3, text_len - 1 + flops.llm_image_tokens(cfg)).values()) == forward["llm"]
    # Forward + backward: the whole step.
    step = flops.step_flops(cfg, shape, [(3, text_len)])
    assert step["total"] == _measured(model, batch, train=True)["total"]
    assert step["total"] == sum(step[k] for k in ("vit_hr", "vit_lr", "connector", "finding_head", "llm"))


def test_the_vit_passes_follow_the_connector() -> None:
    """HILT runs the ViT on HR and LR; lr-only on LR alone; all-tokens on HR alone."""
    shape = flops.LLMShape(64, 1, 1, 1, 64, 64, 10, 0, (), False)
    hilt = flops.step_flops(model_config(connector="hilt", resolution="cpu-micro"), shape, [(1, 4)])
    lr_only = flops.step_flops(model_config(connector="lr-only", resolution="cpu-micro"), shape, [(1, 4)])
    all_tokens = flops.step_flops(
        model_config(connector="all-tokens", resolution="cpu-micro"), shape, [(1, 4)]
    )
    assert hilt["vit_hr"] > hilt["vit_lr"] > 0
    assert lr_only["vit_hr"] == 0 and lr_only["vit_lr"] == hilt["vit_lr"]
    assert all_tokens["vit_lr"] == 0 and all_tokens["vit_hr"] == hilt["vit_hr"]


def test_peaks_by_device_name(monkeypatch) -> None:
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_bf16_flops("NVIDIA H200") == 989e12
    assert flops.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_bf16_flops("cpu") is None and flops.peak_bf16_flops(None) is None
    monkeypatch.setenv(flops.PEAK_ENV, "100")
    assert flops.peak_bf16_flops("cpu") == 100e12
