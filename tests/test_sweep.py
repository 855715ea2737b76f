"""python -m hilt_scale.sweep: grids, the plan, failed runs and resume, the tables, the hr-study scoring."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hilt_scale.sweep import execute
from hilt_scale.sweep.__main__ import main
from hilt_scale.sweep.grid import QUICK_VARIANTS, expand, grids_for, projector_axis_ready
from hilt_scale.sweep.study import group_f1, plot_study, study_markdown, study_results


def test_experiments_expand_with_axes_seeds_and_recipes() -> None:
    specs = expand(grids_for("fig5d", "paper", {}), "paper", [0, 1])
    assert [s.name for s in specs] == [
        "llm-llama3-8b__seed-0",
        "llm-llama3-70b__seed-0",
        "llm-llama3-8b__seed-1",
        "llm-llama3-70b__seed-1",
    ]
    big = specs[1]
    assert big.ds == "ds_configs/zero3_qlora.json" and big.recipe == "ctrate-llama3-70b-qlora"
    assert specs[0].ds == "ds_configs/zero2.json" and specs[0].recipe == "ctrate-llama3-8b"
    # An axis given on the command line replaces the experiment's values; sizes become --set.
    specs = expand(grids_for("fig5a", "cpu", {"hr_size": ["16x32x32"]}), "cpu", [3])
    assert len(specs) == 1 and "resolution.hr_size=16x32x32" in specs[0].sets and specs[0].seed == 3
    assert specs[0].train_args("OUT")[-4:] == ["--seed", "3", "--out", "OUT"]
    fig8 = expand(grids_for("fig8", "cpu", {}), "cpu", [0])
    assert len(fig8) == 5
    assert all(bool(s.pending) == (not projector_axis_ready()) for s in fig8 if "projector_layers" in s.axes)
    with pytest.raises(ValueError):
        grids_for("hr-study", "paper", {})


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_every_connector_keeps_hilts_room_for_the_report(scale) -> None:
    """table3 at both scales: all-tokens (and 2d at paper size) used to get the default
    max_length=512, which the trainer refuses when 512 visual tokens leave no room for a report."""
    from hilt_scale.info import inspect_model
    from hilt_scale.model.config import model_config
    from hilt_scale.recipes import recipe

    rooms = {}
    for spec in expand(grids_for("table3", scale, {}), scale, [0]):
        f = spec.flags
        cfg = model_config(f["vision"], f["connector"], f["llm"], recipe(spec.recipe).resolution, spec.sets)
        tokens = inspect_model(cfg, with_llm=False)["visual_tokens"]
        rooms[f["connector"]] = cfg.max_length - tokens
        assert cfg.max_length <= cfg.llm.max_position, (spec.name, cfg.max_length)
    assert rooms["all-tokens"] == rooms["hilt"] >= 448, rooms
    assert all(room >= rooms["hilt"] for room in rooms.values()), rooms
    given = expand(grids_for("table3", scale, {}), scale, [0], sets=["max_length=2048"])
    # Learned queries have no footprint: they run with global keys whatever the recipe's HILT uses.
    assert all(s.sets == ["max_length=2048"] for s in given if s.flags["connector"] != "random-queries")
    (rq,) = [s for s in given if s.flags["connector"] == "random-queries"]
    assert rq.sets == ["connector.keys=global", "max_length=2048"]


def test_an_hr_study_with_the_calcium_channel_plans_and_gets_hu_shards(capsys) -> None:
    """The calcium channel's ViT takes two raw channels (window, calcium): the planner's meta-device
    build fed it one and the sweep crashed before any run. Its phantom must be int16 (HU)."""
    calcium = ["vision.input=window+contrast+calcium"]
    rows = main(["--experiment", "hr-study", "--scale", "cpu", "--set", calcium[0], "--plan"])["plan"]
    assert len(rows) == 18 and all(r["status"] == "planned" for r in rows), rows[0]
    specs = expand(grids_for("hr-study", "cpu", {}), "cpu", [0], sets=calcium)
    for s in specs:
        s.flags["vision"] = "vit-micro-conv"  # the study's budget, as main sets it
    assert execute.sweep_shard_dtype(specs) == "int16"
    for s in specs:
        s.sets = []
    assert execute.sweep_shard_dtype(specs) == "uint8"


def test_collect_finds_the_hu_shards_the_sweep_wrote(tmp_path: Path) -> None:
    """--collect looked for uint8 shard names only, so an hr-study with HU shards got no shard set
    and an empty constant-report row (round 9); a uint8 set beside them must not be taken."""
    specs = expand(grids_for("hr-study", "cpu", {}), "cpu", [0], sets=["vision.input=window+contrast+calcium"])
    for s in specs:
        s.flags["vision"] = "vit-micro-conv"
    for name in ("shards-32x64x64", "shards-32x64x64-int16"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "index.json").write_text("{}")
    rows = execute.present(specs, tmp_path, {"n": 10, "seed": 0})
    assert [r["status"] for r in rows] == ["not run"] * len(specs)
    assert {s.flags.get("data") for s in specs} == {str(tmp_path / "data" / "shards-32x64x64-int16")}


def test_the_hr_study_runs_its_recipe_by_default_and_the_command_line_overrides_it(capsys) -> None:
    """Without flags every hr-study run gets the calcium channel (high-pass), 400 vision warm-up
    steps and 300 full steps of one micro-batch of 8 (docs/SWEEPS.md, rounds 7, 9, 12 and 13); a
    later --set and --max-steps replace them."""
    default = main(["--experiment", "hr-study", "--quick", "--seeds", "0", "--plan"])["plan"]
    plain = main(
        ["--experiment", "hr-study", "--quick", "--seeds", "0", "--plan", "--max-steps", "9",
         "--set", "vision.input=window+contrast"]
    )["plan"]  # fmt: skip
    assert len(default) == len(plain) == 3
    for row in default:
        command = row["launch"]
        assert "--set vision.input=window+contrast+calcium" in command and "--max-steps 300" in command
        assert "--set vision.calcium=highpass" in command and "--vision-warmup-steps 400" in command
        assert "--micro-batch 8" in command and "--eval-batch 16" in command
    for row in plain:
        command = row["launch"]
        assert command.index("vision.input=window+contrast+calcium") < command.index("vision.input=window+contrast ")
        assert "--max-steps 9" in command and "--max-steps 300" not in command


def test_fig5d_paper_plan_70b_uses_zero3_and_4bit(capsys) -> None:
    rows = main(["--experiment", "fig5d", "--scale", "paper", "--plan"])["plan"]
    small, big = rows
    assert small["zero_stage"] == 2 and small["quantization"] == "none"
    assert big["zero_stage"] == 3 and big["quantization"] == "nf4"
    assert "--ds ds_configs/zero3_qlora.json" in big["launch"] and "--hostfile" in big["launch_multinode"]
    assert 0 < big["mem_gb"]["total"] and big["frozen_base_gb"] < 70  # 4-bit: far below 140 GB of bf16
    assert big["trainable_params"] > small["trainable_params"] > 1e8
    out = capsys.readouterr().out
    assert "| llm-llama3-70b__seed-0 | zero3_qlora.json | 3 | 4-bit nf4 |" in out


def _fake_done(run_dir: Path, tokens: int = 64) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = {"average": 50.0, "ce_micro_f1": 0.4, "ce_macro_f1": 0.2}
    summary = {
        "method": "hilt",
        "hr_size": [32, 64, 64],
        "visual_tokens": tokens,
        "llm": "llm-tiny",
        "final": final,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rec = {
        "key": "k",
        "reference": "There is a millimetric nodule of 4 mm in the left lung upper lobe.",
        "generated": "There is a millimetric nodule of 4 mm in the left lung upper lobe.",
    }
    (run_dir / "predictions.jsonl").write_text(json.dumps(rec) + "\n")


def test_failed_run_is_recorded_and_finished_runs_are_not_rerun(tmp_path: Path) -> None:
    specs = expand(grids_for(None, "cpu", {"connector": ["hilt", "lr-only"]}), "cpu", [0])
    _fake_done(tmp_path / "runs" / specs[0].name)
    specs[1].command = lambda out: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    rows = execute.run_sweep(specs, tmp_path, log=lambda *_: None)
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert rows[0]["resumed"] and rows[1]["rc"] == 3 and rows[1]["log_tail"] == ["boom"]
    rows = execute.collect(rows, tmp_path, phantom=True)
    result = execute.write_outputs(rows, tmp_path, None, "test")
    assert "failed: seed 0 (rc 3)" in result["table"]
    assert "50.00 ± 0.00" in result["table"] and (tmp_path / "sweep.png").exists()
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"][1]["status"] == "failed"


def test_a_stopped_run_is_resumed_not_counted_as_done(tmp_path: Path) -> None:
    """A preempted run writes summary.json with ``stopped``: the sweep reruns it with --resume
    (found in the hr-study: a SIGTERM'd run was skipped as done)."""
    (spec,) = expand(grids_for(None, "cpu", {"connector": ["hilt"]}), "cpu", [0])
    run_dir = tmp_path / "runs" / spec.name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "LATEST").write_text("step00000041")
    (run_dir / "summary.json").write_text(json.dumps({"stopped": "SIGTERM", "steps": 41}))
    assert not execute.finished(run_dir)
    argv = tmp_path / "argv.json"
    spec.command = lambda out: [sys.executable, "-c", f"import json, sys; json.dump(sys.argv, open({str(argv)!r}, 'w'))"]
    rows = execute.run_sweep([spec], tmp_path, log=lambda *_: None)
    assert json.loads(argv.read_text())[-1] == "--resume"
    assert rows[0]["status"] == "failed"  # it wrote no final summary
    _fake_done(run_dir)
    assert execute.finished(run_dir) and execute.run_sweep([spec], tmp_path, log=lambda *_: None)[0]["resumed"]


def test_parallel_runs_overlap_get_their_share_of_threads_and_keep_the_order(tmp_path: Path, monkeypatch) -> None:
    """--parallel 2: both runs are alive at once (each waits until it sees the other's start
    file), each gets OMP_NUM_THREADS = cores // 2, and the rows come back in plan order even
    when the second run ends first."""
    specs = expand(grids_for(None, "cpu", {"connector": ["hilt", "lr-only"]}), "cpu", [0])
    flag = tmp_path / "flags"
    flag.mkdir()
    code = (
        "import os, sys, time, pathlib; d = pathlib.Path({d!r}); (d / {me!r}).write_text(os.environ['OMP_NUM_THREADS'])\n"
        "t = time.time()\n"
        "while not (d / {other!r}).exists():\n"
        "    time.sleep(0.05)\n"
        "    if time.time() - t > 30: sys.exit(9)\n"
        "time.sleep({delay}); sys.exit({rc})"
    )
    specs[0].command = lambda out: [sys.executable, "-c", code.format(d=str(flag), me="a", other="b", delay=1.0, rc=4)]
    specs[1].command = lambda out: [sys.executable, "-c", code.format(d=str(flag), me="b", other="a", delay=0.0, rc=5)]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = execute.run_sweep(specs, tmp_path, log=lambda *_: None, parallel=2)
    assert [r["run"] for r in rows] == [s.name for s in specs]
    assert [r["rc"] for r in rows] == [4, 5]  # neither timed out waiting for the other (rc 9)
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert (flag / "a").read_text() == share and (flag / "b").read_text() == share
    with pytest.raises(ValueError, match="parallel"):
        execute.run_sweep(specs, tmp_path, log=lambda *_: None, parallel=0)


def test_an_exported_thread_count_that_oversubscribes_the_cores_is_kept_but_warned_about(
    tmp_path: Path, monkeypatch
) -> None:
    """OMP_NUM_THREADS=2 exported, --parallel 2, 2 cores: 4 threads on 2 cores (a step ~10x slower,
    docs/SWEEPS.md round 9). The sweep keeps the user's value but says so, naming the fix."""
    specs = expand(grids_for(None, "cpu", {"connector": ["hilt", "lr-only"]}), "cpu", [0])
    code = "import os, sys; sys.exit(int(os.environ['OMP_NUM_THREADS']))"
    for s in specs:
        s.command = lambda out: [sys.executable, "-c", code]
    monkeypatch.setattr(execute.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    logged: list[str] = []
    rows = execute.run_sweep(specs, tmp_path, log=lambda *a: logged.append(" ".join(map(str, a))), parallel=2)
    assert [r["rc"] for r in rows] == [2, 2]  # the user's value reached the runs
    warning = [m for m in logged if "OMP_NUM_THREADS=2" in m]
    assert len(warning) == 1 and "4 threads on 2 cores" in warning[0] and "unset it" in warning[0]
    for value, parallel, cores in [("1", 2, 2), ("2", 2, 4), ("4", 1, 2)]:  # fits, or one run at a time
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        monkeypatch.setattr(execute.os, "cpu_count", lambda cores=cores: cores)
        logged.clear()
        execute.run_sweep(specs, tmp_path / f"{value}-{parallel}-{cores}", log=logged.append, parallel=parallel)
        assert not [m for m in logged if "warning" in str(m)], (value, parallel, cores)


def test_group_f1_tells_hr_only_from_lr_visible(tmp_path: Path) -> None:
    ref = "There is a millimetric nodule of 3 mm in the left lung upper lobe. Cardiomegaly is observed; the heart size is increased."
    records = [
        {
            "key": "a",
            "reference": ref,
            "generated": "No nodule or mass was detected in either lung. The heart is enlarged (cardiomegaly).",
        },
        {
            "key": "b",
            "reference": "Pleural effusion was not observed.",
            "generated": "Pleural effusion was not observed.",
        },
    ]
    g = group_f1(records)
    assert g["f1_hr_only"] == 0.0 and g["positives_hr_only"] == 1
    assert g["f1_lr_visible"] == 1.0 and g["positives_lr_visible"] == 1
    rows = [
        {"run": f"r{i}", "group": v, "axes": {"connector": v}, "seed": i, "status": "done", "visual_tokens": 64,
         "scores": {"f1_hr_only": 0.1 * i, "f1_small_nodule": 0.2 * i, "f1_lr_visible": 0.5, "ce_micro_f1": 0.4,
                    "ce_macro_f1": 0.2, "average": 50.0}}
        for v in QUICK_VARIANTS for i in range(2)
    ]  # fmt: skip
    results = study_results(rows, {**g, "ce_micro_f1": 0.3, "ce_macro_f1": 0.1, "average": 40.0})
    assert results["variants"]["hilt"]["f1_hr_only"]["mean"] == pytest.approx(0.05)
    assert results["variants"]["hilt"]["f1_small_nodule"]["mean"] == pytest.approx(0.1)
    assert "| lr-only | 64 | 2 | 0.050 ± 0.071 | 0.100 ± 0.141 | 0.500 ± 0.000 |" in study_markdown(results)
    plot_study(results, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.slow
def test_cpu_sweep_end_to_end_and_resume(tmp_path: Path) -> None:
    """fig5c at the cpu-micro resolution, 2 ViT sizes x 1 seed: table, PNG; a rerun runs nothing."""
    argv = [
        "--experiment", "fig5c", "--scale", "cpu", "--run", "--out", str(tmp_path),
        "--resolution", "cpu-micro", "--llm", "llm-micro", "--phantom-n", "24", "--max-steps", "2",
        "--micro-batch", "2", "--total-batch", "2", "--eval-limit", "2", "--max-new-tokens", "6",
        "--num-beams", "1", "--vision-warmup-steps", "0",  # not the recipe's 480: minutes of CI
    ]  # fmt: skip
    result = main(argv)
    assert [g["seeds_done"] for g in result["groups"]] == [1, 1], result["table"]
    assert "| vit-micro |" in result["table"] and "| vit-tiny |" in result["table"]
    assert (tmp_path / "fig5c.png").stat().st_size > 1000 and (tmp_path / "table.md").exists()
    for g in result["groups"]:
        assert {"average", "ce_micro_f1", "f1_hr_only", "f1_lr_visible"} <= set(g["metrics"])
    for run in (tmp_path / "runs").iterdir():
        assert json.loads((run / "summary.json").read_text())["vision_warmup"] is None, run.name
    main(argv)  # resume: both runs have summary.json, so nothing is rerun
    again = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert len(again) == 2 and all(r["status"] == "done" and r.get("resumed") for r in again)


def test_lr_only_is_hilt_without_the_hr_attention() -> None:
    """lr-only and HILT share ViT and projector shapes and token count; lr-only ignores what the
    LR view cannot see, HILT does not."""
    import torch

    from hilt_scale.model.config import model_config
    from hilt_scale.model.mllm import build_model, build_tokenizer

    texts = [
        "No nodule or mass was detected in either lung.",
        "There is a 4 mm nodule in the left lung.",
    ] * 20
    models = {}
    for kind in ("hilt", "lr-only"):
        cfg = model_config("vit-micro", kind, "llm-micro", "cpu-micro")
        torch.manual_seed(0)
        models[kind] = build_model(cfg, build_tokenizer(cfg, texts=texts))
    hilt, lr_only = models["hilt"], models["lr-only"]
    assert lr_only.num_visual_tokens == hilt.num_visual_tokens == 8
    assert lr_only.vision.state_dict().keys() == hilt.vision.state_dict().keys()
    lr_only.connector.load_state_dict(hilt.connector.state_dict())
    lr_only.vision.load_state_dict(hilt.vision.state_dict())
    # Two volumes whose 2x2x2 block means agree (the LR view is the same) but whose voxels differ.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (1, 1, 16, 32, 32), generator=g).float()
    b = a.clone()
    b[..., 0::2, 0::2, 0::2] += 4.0
    b[..., 1::2, 0::2, 0::2] -= 4.0
    with torch.no_grad():
        za, zb = lr_only.encode_images(a), lr_only.encode_images(b)
        ha, hb = hilt.encode_images(a), hilt.encode_images(b)
    assert torch.allclose(za, zb, atol=1e-5)
    assert not torch.allclose(ha, hb, atol=1e-5)
