"""The ZeRO-3 evaluation plan: replica when its measured size fits the free memory, else the
per-token path (the 2-rank run itself: tests/test_train_distributed.py, slow)."""

import pytest
import torch
from torch import nn

from hilt_scale.training import zero3_eval


def test_full_param_bytes_counts_every_parameter_in_its_dtype() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3).to(torch.bfloat16))
    assert zero3_eval.full_param_bytes(model) == (10 * 20 + 20) * 4 + (20 * 3 + 3) * 2
    partitioned = nn.Linear(4, 4)
    for p in partitioned.parameters():
        p.ds_numel = p.numel()  # ZeRO-3 keeps the full size here and empties the local tensor
        p.data = torch.empty(0)
    assert zero3_eval.full_param_bytes(partitioned) == (16 + 4) * 4


@pytest.mark.parametrize(("free", "forced", "mode"), [
    (10_000, None, "replica"),
    (999, None, "per-token gathering"),  # 800 bytes x 1.25 head room = 1000 does not fit
    (10_000, "per-token", "per-token gathering"),
])  # fmt: skip
def test_replica_plan_follows_the_measured_free_memory(monkeypatch, free, forced, mode) -> None:
    model = nn.Linear(19, 10)  # 200 parameters, 800 bytes
    monkeypatch.setattr(zero3_eval, "free_bytes", lambda: free)
    if forced:
        monkeypatch.setenv(zero3_eval.FORCE_ENV, forced)
    else:
        monkeypatch.delenv(zero3_eval.FORCE_ENV, raising=False)
    plan = zero3_eval.replica_plan(model)
    assert plan["mode"] == mode
    assert plan["replica_gib"] == round(800 / 2**30, 3) and plan["min_free_gib"] == round(free / 2**30, 3)


def test_free_bytes_on_cpu_shares_the_node_between_its_ranks(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = zero3_eval.free_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert one > 0 and abs(zero3_eval.free_bytes() - one / 4) < one * 0.05  # MemAvailable moves a little
