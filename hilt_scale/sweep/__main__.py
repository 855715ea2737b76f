"""Expand a grid (or a named paper experiment) into training runs, then plan or run them.

    python -m hilt_scale.sweep --experiment fig5d --scale paper --plan
    python -m hilt_scale.sweep --experiment fig5c --scale cpu --run --out runs/sweep-fig5c
    python -m hilt_scale.sweep --experiment hr-study --scale cpu --run --out DIR --seeds 0,1,2 [--quick]
    python -m hilt_scale.sweep --vision vit-micro,vit-tiny --llm llm-micro --seeds 0,1 --run --out DIR

Axes take comma-separated values (sizes as DxHxW). A run is ``python hilt_scale/train.py ...`` in
its own directory DIR/runs/NAME; rerunning the same command resumes the sweep (finished runs
are skipped, stopped ones resume from their checkpoint). See docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hilt_scale.sweep.grid import (
    AXES,
    EXPERIMENT_TITLES,
    EXPERIMENTS,
    QUICK_VARIANTS,
    SCALES,
    expand,
    grids_for,
    parse_list,
)

# TrainConfig flags a sweep passes to every run when given (the budget; same for every run).
PASS_FLAGS = (
    "resolution",
    "epochs",
    "max_steps",
    "lr",
    "micro_batch",
    "total_batch",
    "eval_limit",
    "eval_batch",
    "max_new_tokens",
    "num_beams",
    "vision_warmup_steps",
)
# The hr-study's budget, identical for every variant (docs/SWEEPS.md); flags override it.
# Round 7 (docs/SWEEPS.md) measured the budget on a 1,000-volume phantom with the calcium channel,
# so those are the hr-study's defaults; round 9 added its high-pass form (a seed whose head never
# read aortic calcium read it then). Round 10 moved steps from the whole model to the vision
# warm-up (1,200 + 480 instead of the recipe's 480 + 720): on the same phantom and seeds every
# HILT seed scored higher on HR-only and LR-visible findings, two of three learned nodules (one
# before), and each HILT run takes about as long (a warm-up step costs ~half a full step).
# Round 12 cut it to 400 + 360: with round 11's encoder finding head HILT reads nodules within
# 400 warm-up steps, and on a phantom no run had seen HILT led lr-only and random queries on every
# seed while --quick took about half as long; 400 + 200 was too few report steps (the reports
# missed what the heads read). Round 13 took 300 report steps, one micro-batch of 8 per step (8
# samples per step as before; a warm-up step 0.43 s instead of 0.55 s) and generation 16 volumes at
# a time (the same reports, ~35 % less time): on the same phantom and seeds HILT scored within
# 0.013 of 360 steps and --quick took 41 min instead of 54.
STUDY_BUDGET = {
    "resolution": "cpu-tiny",
    "vision": "vit-micro-conv",  # the main job's encoder (and its finding loss, from the recipe)
    "llm": "llm-tiny",
    "vision_warmup_steps": "400",
    "max_steps": "300",
    "micro_batch": "8",
    "eval_batch": "16",
    "num_beams": "1",
}
STUDY_SETS = ["vision.input=window+contrast+calcium", "vision.calcium=highpass"]  # before the command line's --set
STUDY_PHANTOM_N = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hilt_scale.sweep",
        description=__doc__.split("\n")[0],
        epilog="experiments: " + "; ".join(f"{k} = {v}" for k, v in EXPERIMENT_TITLES.items()),
    )
    p.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--scale", choices=SCALES, default="cpu")
    for axis in AXES:
        p.add_argument("--" + axis.replace("_", "-"), dest=axis, metavar="A,B,...", help=f"axis {axis}")
    p.add_argument("--seeds", default=None, help="training seeds, e.g. 0,1,2 (default 0; hr-study 0,1,2)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="print the plan (Markdown + JSON), run nothing")
    mode.add_argument("--run", action="store_true", help="run (or resume) the sweep")
    mode.add_argument(
        "--collect", action="store_true", help="only write the table/figure from the runs finished so far"
    )
    p.add_argument("--out", type=Path, help="sweep directory (default runs/sweep-EXPERIMENT-SCALE)")
    p.add_argument("--quick", action="store_true", help="hr-study: hilt, lr-only and random-queries only")
    for name in PASS_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help="passed to every run")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="for every run")
    p.add_argument(
        "--data", help="shard set for every run (default: cpu = the sweep's own phantom; paper = recipe)"
    )
    p.add_argument(
        "--phantom-n", type=int, default=None, help=f"cpu scale: phantom volumes (240; hr-study {STUDY_PHANTOM_N})"
    )
    p.add_argument(
        "--phantom-seed", type=int, default=0, help="cpu scale: phantom seed, the same for every run"
    )
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before a run counts as failed")
    p.add_argument(
        "--parallel", type=int, default=1, help="runs at a time (cpu: each gets cores // N threads; default 1)"
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory the plan must fit (GB)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    exp, scale = args.experiment, args.scale
    given = {axis: parse_list(getattr(args, axis)) for axis in AXES}
    if exp == "hr-study" and args.quick and not given["connector"]:
        given["connector"] = list(QUICK_VARIANTS)
    try:
        grids = grids_for(exp, scale, given)
    except (KeyError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    seeds = [int(s) for s in parse_list(args.seeds or ("0,1,2" if exp == "hr-study" else "0"))]
    flags = dict(STUDY_BUDGET) if exp == "hr-study" else {}
    if scale == "cpu" and exp != "hr-study":
        flags.setdefault("resolution", "cpu-tiny")
    flags.update({k: getattr(args, k) for k in PASS_FLAGS if getattr(args, k) is not None})
    # The budget's model fields are defaults: an axis of the grid replaces them per run.
    specs = expand(
        grids,
        scale,
        seeds,
        {k: v for k, v in flags.items() if k not in ("vision", "llm", "connector")},
        (STUDY_SETS if exp == "hr-study" else []) + args.set,
        args.data,
    )
    for s in specs:
        for k in ("vision", "llm", "connector"):
            if k in flags and k not in s.axes:
                s.flags[k] = flags[k]
    out = args.out or Path("runs") / f"sweep-{exp or 'grid'}-{scale}"
    title = f"{EXPERIMENT_TITLES.get(exp or '', 'sweep')}, scale {scale}"
    if args.plan:
        from hilt_scale.sweep.plan import plan_markdown, plan_run

        rows = [plan_run(s, out, args.gpus_per_node, args.gpu_gb) for s in specs]
        print(f"# Plan: {title}\n")
        print(plan_markdown(rows, args.gpu_gb))
        print(json.dumps({"experiment": exp, "scale": scale, "runs": rows}))
        return {"plan": rows}
    from hilt_scale.sweep import execute

    phantom = None
    if scale == "cpu" and args.data is None:
        n = args.phantom_n or (STUDY_PHANTOM_N if exp == "hr-study" else 240)
        phantom = {"n": n, "seed": args.phantom_seed}
    if args.collect:
        rows = execute.present(specs, out, phantom)
    else:
        rows = execute.run_sweep(specs, out, args.run_timeout, phantom=phantom, parallel=args.parallel)
    rows = execute.collect(rows, out, phantom is not None or exp == "hr-study")
    result = execute.write_outputs(rows, out, exp, title)
    print(f"\n# {title}\n\n{result['table']}\n")
    if result["png"]:
        print(f"figure: {result['png']}")
    if exp == "hr-study":
        from hilt_scale.sweep.study import plot_study, study_markdown, study_results
        from shards.io import write_json_atomic, write_text_atomic

        shards = next((s.flags["data"] for s in specs if "data" in s.flags), None)
        baseline = execute.constant_report_groups(shards) if shards else None
        results = study_results(rows, baseline)
        results["budget"] = {"flags": flags, "seeds": seeds, "phantom": phantom, "data": shards}
        write_json_atomic(out / "results.json", results)
        md = study_markdown(results)
        write_text_atomic(out / "results.md", md + "\n")
        plot_study(results, str(out / "hr_study.png"))
        print(f"\n{md}\n\nresults: {out / 'results.json'}, figure: {out / 'hr_study.png'}")
        result["results"] = results
    return result


if __name__ == "__main__":
    main()
