"""The inspect command: token counts at paper sizes and parameter counts, without weights."""

import json

from hilt_scale.info import main

PAPER = ["--vision", "vit-base", "--hr-size", "256,512,512", "--lr-size", "64,128,128"]


def run(capsys, *argv):
    info = main(list(argv))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == info  # the final line is the machine-readable copy
    return info


def test_hilt_reports_64_visual_tokens_at_both_hr_sizes(capsys):
    big = run(capsys, *PAPER, "--connector", "hilt", "--llm", "llama3-8b")
    assert (big["hr_tokens"], big["lr_tokens"], big["visual_tokens"]) == (4096, 64, 64)
    assert 8.0e9 < big["llm_params"] < 8.1e9  # Llama-3-8B
    small = run(
        capsys, "--vision", "vit-base", "--hr-size", "128,256,256", "--lr-size", "64,128,128", "--llm", "none"
    )
    assert (small["hr_tokens"], small["visual_tokens"]) == (512, 64)


def test_all_tokens_reports_4096(capsys):
    info = run(capsys, *PAPER, "--connector", "all-tokens", "--llm", "none")
    assert info["visual_tokens"] == 4096


def test_lora_and_trainable_counts(capsys):
    info = run(capsys, "--vision", "vit-micro", "--resolution", "cpu-micro", "--llm", "llm-micro")
    # llm-micro: hidden 64, MLP 128, 2 layers, LoRA r=8 on q,k,v,o (64->64), gate/up (64->128), down (128->64).
    per_layer = 8 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert info["llm_trainable_params"] == 2 * per_layer
    assert (
        info["trainable_params"]
        == info["vision_params"] + info["connector_params"] + info["llm_trainable_params"]
    )
    assert info["total_params"] == info["trainable_params"] + info["llm_params"]


def test_2d_baseline_tokens_at_normal_and_paper_resolution(capsys):
    # The paper's 2D row (LLaVA-1.5 / R2GenGPT): the HR volume, slices as channels, 16x16 patches.
    normal = run(capsys, "--connector", "2d", "--resolution", "normal", "--llm", "none")
    assert (normal["patch_size"], normal["visual_tokens"]) == ([128, 16, 16], 256)
    paper = run(capsys, "--connector", "2d", "--resolution", "paper", "--llm", "none")
    assert (paper["patch_size"], paper["visual_tokens"]) == ([256, 16, 16], 1024)
