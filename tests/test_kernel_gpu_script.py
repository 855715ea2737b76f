"""tests/gpu/gpu_check.sh, the one device call, kept from rotting: its plan fits the budget and the
device's limits, and its CPU dry run (same steps, same files, the Triton interpreter and tiny
models) ends with every step ok and at most 8 files under $OUT."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "gpu_check.sh"
STEPS = ["env", "kernel_tests", "kernel_bench", "bench_step_zero2"]  # run within the budget, in order


def plan() -> tuple[int, dict[str, int]]:
    """(budget seconds, {step: timeout seconds}) as written in the script."""
    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", text).group(1))
    steps = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\w+) (\d+)", text, re.M)}
    return budget, steps


def test_plan_fits_one_device_call():
    """Kernel first; the timeouts of the steps that must run sum to less than the budget, and the
    budget leaves room in a 15-minute device session (a multi-minute start, one short rerun)."""
    budget, steps = plan()
    assert list(steps)[: len(STEPS)] == STEPS, steps
    assert sum(steps[s] for s in STEPS) < budget <= 6.5 * 60, (budget, steps)
    text = SCRIPT.read_text()
    assert '--out "$RES"' in text  # the kernel bench appends to the one JSON-lines file


def test_outputs_ignored_and_wheels_only_what_the_image_lacks():
    ignore = (ROOT / ".gitignore").read_text().split()
    for pattern in ("/gpu_out/", "/kernel_bench/", "/.whl*/"):
        assert pattern in ignore, pattern
    wheels = (ROOT / "tests" / "gpu" / "gpu_wheels.sh").read_text()
    downloads = " ".join(
        line for line in wheels.splitlines() if "pip download" in line or line.startswith("  ")
    )
    for present in ("pytest", "pluggy", "rich", "iniconfig", "pygments", "absl-py", "joblib", "click"):
        assert not re.search(rf"(?<![\w-]){present}(?![\w-])", downloads), present  # in the GPU image already
    for missing in ("deepspeed", "webdataset", "nibabel", "zstandard", "bitsandbytes"):
        assert missing in wheels, missing


@pytest.mark.slow
def test_cpu_dry_run_writes_one_results_file(tmp_path):
    """The dry run: every step ok, two files under $OUT, the kernel rows and the DeepSpeed row in
    results.jsonl (about a minute on a 2-core machine; the first DeepSpeed launch builds a comm op)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A loaded CI machine can be many times slower than this one: 8x the planned timeouts.
    env.update(
        OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable, GPU_CHECK_DRY_SCALE="8"
    )
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gpu_check.log", "results.jsonl"], files
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records if r["kind"] == "status"}
    assert all(status[s] == "ok" for s in STEPS), (status, run.stdout[-3000:])
    rows = [r for r in records if r["kind"] == "row" and r["step"] == "kernel_bench"]
    assert {r["impl"] for r in rows} >= {"triton", "eager"} and all("err_O" in r for r in rows), rows
    step = next(r for r in records if r["kind"] == "result" and r["step"] == "bench_step_zero2")
    assert {row["engine"] for row in step["result"]["rows"]} == {"torch", "deepspeed"}
    assert "summary" in (out / "gpu_check.log").read_text()
