"""hilt_scale.bench_step on CPU at the micro presets: rows, parts, files, skips, OOM, re-render."""

import importlib.util
import json

import pytest
import torch

from hilt_scale import bench_step
from hilt_scale.model.config import model_config

FAST = ["--micro-batch", "1", "--text-tokens", "24", "--warmup", "0", "--steps", "1", "--device", "cpu"]


def test_cpu_grid_rows_parts_and_files(tmp_path, capsys):
    out = bench_step.main(
        ["--connectors", "hilt,all-tokens", "--checkpointing", "off,on", *FAST, "--out", str(tmp_path)]
    )
    rows = out["rows"]
    assert [(r["connector"], r["ckpt"]) for r in rows] == [
        ("hilt", "off"), ("hilt", "on"), ("all-tokens", "off"), ("all-tokens", "on"),
    ]  # fmt: skip
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["samples_per_s"] > 0 for r in rows)
    # cpu-micro: HR 64 tokens, LR 8; HILT hands the LLM the LR count, all-tokens every HR token.
    assert {r["connector"]: r["visual_tokens"] for r in rows} == {"hilt": 8, "all-tokens": 64}
    assert all(r["seq_len"] == 24 + r["visual_tokens"] for r in rows)
    hilt = rows[0]
    assert {"vit_hr_ms", "vit_lr_ms", "llm_ms", "parts_ms", "step_over_parts"} <= set(hilt)
    assert "vit_lr_ms" not in rows[2]  # all-tokens never encodes the LR view
    assert "hilt_ckpt_off_step_over_parts" in out["targets"]
    printed = capsys.readouterr().out
    assert "| connector | ckpt | mb |" in printed
    assert json.loads(printed.strip().splitlines()[-1])["rows"][0]["connector"] == "hilt"
    for name in ("bench_step.md", "bench_step.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "bench_step.json").read_text())
    assert "partial" not in saved and len(saved["rows"]) == 4  # rewritten after each row, final at the end
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench_step.png").read_bytes()[:4] == b"\x89PNG"


def test_four_bit_on_cpu_is_skipped_with_reason():
    out = bench_step.main(
        ["--connectors", "hilt", "--checkpointing", "on", *FAST, "--set", "llm.quantization=nf4"]
    )
    (row,) = out["rows"]
    assert row["status"] == "skipped" and "CUDA" in row["note"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_nf4_builder_trains_lora_over_a_4bit_base():
    """The GPU-only path's builder (meta model, Linear4bit from random weights) runs on bnb's CPU kernels."""
    import bitsandbytes as bnb

    cfg = model_config(
        "vit-micro", "hilt", "llm-micro", "cpu-micro", ["llm.quantization=nf4", "llm.dtype=bfloat16"]
    )
    dev = torch.device("cpu")
    llm = bench_step.build_bench_llm(cfg, dev)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules())
    assert not any(t.is_meta for t in [*llm.parameters(), *llm.buffers()])
    model = bench_step.assemble(cfg, llm, dev, torch.bfloat16)
    bench_step.set_checkpointing(model, True)
    res = bench_step.measure_step(model, bench_step.synthetic_batch(model, 1, 16, dev), 0, 1, dev)
    assert res["ms"] > 0 and torch.isfinite(torch.tensor(res["loss"]))


def test_oom_is_reported_and_grads_released():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)

    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    res = bench_step.guarded(boom, [p], torch.device("cpu"))
    assert res["status"] == "OOM" and "out of memory" in res["error"] and p.grad is None
    row = bench_step.finish_row(
        {"status": "OOM", "note": res["error"], "micro_batch": 1}, bench_step.parse_args([])
    )
    assert "OOM: CUDA out of memory" in bench_step.format_table([row])


def test_rerender_from_json_adds_loader_workers(tmp_path):
    rows = [
        {"connector": "hilt", "ckpt": "on", "micro_batch": 1, "engine": "torch", "status": "ok", "note": "",
         "visual_tokens": 64, "seq_len": 576, "ms": 200.0, "peak_alloc_gib": 20.0, "peak_reserved_gib": 22.0},
        {"connector": "all-tokens", "ckpt": "on", "micro_batch": 1, "engine": "torch", "status": "ok", "note": "",
         "visual_tokens": 4096, "seq_len": 4608, "ms": 600.0, "peak_alloc_gib": 50.0, "peak_reserved_gib": 52.0},
    ]  # fmt: skip
    src = tmp_path / "in.json"
    src.write_text(
        json.dumps(
            {"device": "x", "vision": "v", "llm": "l", "resolution": "r", "dtype": "bf16", "rows": rows}
        )
    )
    out = bench_step.main(
        ["--from-json", str(src), "--loader-samples-per-s", "2.0", "--out", str(tmp_path), "--name", "re"]
    )
    assert [r["loader_workers"] for r in out["rows"]] == [3, 1]  # 5 and 1.67 samples/s over 2 per worker
    assert out["targets"]["all_tokens_over_hilt_time_ckpt_on"] == pytest.approx(3.0)
    assert out["targets"]["all_tokens_over_hilt_memory_ckpt_on"] == pytest.approx(2.5)
    assert out["rows"][0]["fits_80gb"] is True
    assert (tmp_path / "re.md").exists()
