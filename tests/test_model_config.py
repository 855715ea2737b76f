"""Config presets, CLI-style overrides and JSON round trip."""

import dataclasses

import pytest

from hilt_scale.model.config import (
    LLM_PRESETS,
    VISION_PRESETS,
    apply_overrides,
    from_dict,
    grid,
    model_config,
    preset,
    to_dict,
)


def test_vision_presets_match_the_issue():
    got = {k: (v.width, v.depth, v.heads) for k, v in VISION_PRESETS.items()}
    assert got["vit-tiny"] == (192, 12, 3)
    assert got["vit-small"] == (384, 12, 6)
    assert got["vit-base"] == (768, 12, 12)


def test_paper_resolution_gives_4096_hr_and_64_lr_tokens():
    res = preset("resolution", "paper")
    assert grid(res.hr_size, res.patch_size) == (16, 16, 16)
    assert grid(res.lr_size, res.patch_size) == (4, 4, 4)


def test_real_llm_presets_carry_architecture_and_a_path():
    for name in ("llama3-8b", "llama3-70b", "llama2-7b", "mistral-7b"):
        cfg = LLM_PRESETS[name]
        assert cfg.path and cfg.hidden_size >= 4096 and cfg.vocab_size >= 32000
    assert LLM_PRESETS["llama3-70b"].quantization == "nf4"


def test_presets_are_copies():
    a = preset("vision", "vit-base")
    a.depth = 1
    assert preset("vision", "vit-base").depth == 12


def test_overrides_parse_by_field_type():
    cfg = model_config(
        overrides=[
            "llm.lora_r=16",
            "llm.lora_dropout=0.05",
            "llm.lora=false",
            "llm.lora_targets=q_proj,v_proj",
            "llm.path=none",
            "resolution.hr_size=64,128,128",
            "connector.attn_scale=paper",
            "max_length=256",
        ]
    )
    assert cfg.llm.lora_r == 16 and cfg.llm.lora_dropout == 0.05 and cfg.llm.lora is False
    assert cfg.llm.lora_targets == ("q_proj", "v_proj")
    assert cfg.llm.path is None
    assert cfg.resolution.hr_size == (64, 128, 128)
    assert cfg.connector.attn_scale == "paper" and cfg.max_length == 256


@pytest.mark.parametrize(
    "override, message",
    [
        ({"llm.no_such_field": "1"}, "no_such_field"),
        ({"nosection.width": "1"}, "nosection"),
        ({"vision.width": "wide"}, "vision.width"),
        ({"connector.attn_impl": "cuda"}, "connector.attn_impl"),
        ({"resolution.hr_size": "30,128,128"}, "resolution.hr_size"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises((KeyError, ValueError), match=message):
        model_config(overrides=override)


def test_unknown_preset_is_an_error_but_unknown_llm_is_a_path():
    with pytest.raises(KeyError, match="vit-huge"):
        model_config(vision="vit-huge")
    cfg = model_config(llm="/models/my-llama")
    assert cfg.llm.path == "/models/my-llama"


def test_dict_round_trip_and_unknown_key():
    cfg = model_config(vision="vit-tiny", connector="pooled", llm="llama3-8b", resolution="paper")
    data = to_dict(cfg)
    assert from_dict(data) == cfg
    data["llm"]["bogus"] = 1
    with pytest.raises(KeyError, match="bogus"):
        from_dict(data)


def test_apply_overrides_leaves_the_input_alone():
    cfg = model_config()
    new = apply_overrides(cfg, {"vision.depth": 5})
    assert new.vision.depth == 5 and cfg.vision.depth == dataclasses.replace(cfg.vision).depth != 5
