"""Step telemetry (runlog.StepMeter): tokens/s, data wait, memory, FLOPs, MFU; metrics.jsonl rows."""

import json
from types import SimpleNamespace

import pytest
import torch

from hilt_scale.model.config import model_config
from hilt_scale.model.mllm import hf_config
from hilt_scale.training import flops
from hilt_scale.training.runlog import RunLog, StepMeter


def _meter(monkeypatch, peak_tflops: str | None = None) -> StepMeter:
    if peak_tflops is None:
        monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    else:
        monkeypatch.setenv(flops.PEAK_ENV, peak_tflops)
    cfg = model_config(llm="llm-micro", resolution="cpu-micro")
    model = SimpleNamespace(cfg=cfg, llm=SimpleNamespace(config=hf_config(cfg.llm)), num_image_tokens=8)
    return StepMeter(model, world=1)


def _batch(mask: list[list[int]]) -> dict:
    return {"attention_mask": torch.tensor(mask)}


def test_a_step_counts_tokens_wait_and_flops(monkeypatch) -> None:
    meter = _meter(monkeypatch, peak_tflops="0.001")  # 1 GFLOP/s "device": MFU is defined
    meter.batch(_batch([[1, 1, 1, 0], [1, 1, 1, 1]]), wait_s=0.25)  # 2 volumes, 7 - 2 placeholders
    meter.batch(_batch([[1, 1, 1, 1, 1, 1]]), wait_s=0.25)  # 1 volume, 6 - 1
    row = meter.step(2.0)
    assert row["visual_tokens_per_s"] == pytest.approx(3 * 8 / 2.0)
    assert row["text_tokens_per_s"] == pytest.approx((5 + 5) / 2.0)
    assert row["data_wait_s"] == pytest.approx(0.5) and row["data_wait_share"] == pytest.approx(0.25)
    expected = flops.step_flops(meter.cfg, meter.shape, [(2, 4), (1, 6)])["total"]
    assert row["model_tflop_per_step"] == pytest.approx(expected / 1e12)
    assert row["mfu"] == pytest.approx(expected / 2.0 / 1e9)
    assert row["cpu_rss_peak_gib"] > 0.01
    # The counts start again for the next step.
    meter.batch(_batch([[1, 1]]), wait_s=0.0)
    assert meter.step(1.0)["text_tokens_per_s"] == pytest.approx(1.0)


def test_means_skip_the_first_step_and_mfu_is_omitted_without_a_peak(monkeypatch) -> None:
    meter = _meter(monkeypatch)
    for step_s in (10.0, 1.0, 3.0):
        meter.batch(_batch([[1, 1, 1]]), wait_s=0.5)
        assert "mfu" not in meter.step(step_s)
    means = meter.means()
    assert means["steps_averaged"] == 2 and means["step_time_s"] == pytest.approx(2.0)
    assert means["data_wait_share"] == pytest.approx((0.5 + 0.5 / 3) / 2)
    assert means["mfu"] is None and "no bf16 peak known for 'cpu'" in means["mfu_note"]
    assert "MFU omitted" in meter.describe()


def test_telemetry_reaches_metrics_jsonl_and_the_console(monkeypatch, tmp_path, capsys) -> None:
    meter = _meter(monkeypatch)
    meter.batch(_batch([[1, 1, 1]]), wait_s=0.1)
    row = meter.step(0.5)
    with RunLog(tmp_path, enabled=True, total_steps=1) as log:
        log.step(1, 2.5, 1e-4, 8.0, 0, row, {"findings_loss": 0.25})
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == 2.5 and logged["text_tokens_per_s"] == pytest.approx(4.0)
    assert logged["findings_loss"] == 0.25
    assert logged["data_wait_share"] == pytest.approx(0.2)
    out = capsys.readouterr().out
    assert "16 vis + 4 text tok/s" in out and "data 20 %" in out and "findings_loss 0.2500" in out
