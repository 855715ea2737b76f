"""Experiments and grids: which runs a sweep is made of, and the training command of each.

A sweep is a list of ``RunSpec``: one training run (one seed of one grid point). A grid is the
product of axes (``vision``, ``llm``, ``connector``, ``hr_size``, ``lr_size``,
``projector_layers``) times the seeds; a named experiment is a union of such grids per scale
(``cpu``: the phantom and tiny presets, runs on a laptop; ``paper``: CT-RATE shards and the
paper's presets, recipe ctrate-llama3-8b, or ctrate-llama3-70b-qlora for the 70B LLM).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hilt_scale.model.config import ConnectorConfig

AXES = ("vision", "llm", "connector", "hr_size", "lr_size", "projector_layers")
SCALES = ("cpu", "paper")
# The hr-study's variants (docs/SWEEPS.md); --quick keeps the first three.
STUDY_VARIANTS = ("hilt", "lr-only", "random-queries", "all-tokens", "pooled", "2d")
QUICK_VARIANTS = STUDY_VARIANTS[:3]

# experiment -> scale -> list of grids (axis -> values); a grid's runs are its axes' product.
EXPERIMENTS: dict[str, dict[str, list[dict[str, list[str]]]]] = {
    "table3": {
        "cpu": [{"connector": ["hilt", "random-queries", "all-tokens", "pooled", "2d", "lr-only"]}],
        "paper": [{"connector": ["hilt", "random-queries", "all-tokens", "pooled", "2d", "lr-only"]}],
    },
    "table4": {
        "cpu": [{"lr_size": ["8x16x16", "16x32x32", "32x64x64"]}],
        "paper": [{"lr_size": ["32x64x64", "64x128x128", "128x256x256"]}],
    },
    "fig5a": {
        "cpu": [{"hr_size": ["32x32x32", "32x64x64"]}],
        "paper": [{"hr_size": ["256x128x128", "256x256x256", "256x512x512"]}],
    },
    "fig5b": {
        "cpu": [{"hr_size": ["16x64x64", "32x64x64"]}],
        "paper": [{"hr_size": ["64x512x512", "128x512x512", "256x512x512"]}],
    },
    "fig5c": {
        "cpu": [{"vision": ["vit-micro", "vit-tiny"]}],
        "paper": [{"vision": ["vit-tiny", "vit-small", "vit-base"]}],
    },
    "fig5d": {
        "cpu": [{"llm": ["llm-micro", "llm-tiny"]}],
        "paper": [{"llm": ["llama3-8b", "llama3-70b"]}],
    },
    "fig8": {
        "cpu": [{"llm": ["llm-micro", "llm-tiny"]}, {"projector_layers": ["1", "2", "3"]}],
        "paper": [
            {"llm": ["llama2-7b", "mistral-7b", "llama3-8b", "llama3-70b"]},
            {"projector_layers": ["1", "2", "3"]},
        ],
    },
    "hr-study": {"cpu": [{"connector": list(STUDY_VARIANTS)}]},
}
EXPERIMENT_TITLES = {
    "table3": "Table 3: components (connector variants)",
    "table4": "Table 4: LR resolution",
    "fig5a": "Fig. 5a: in-plane resolution",
    "fig5b": "Fig. 5b: number of slices",
    "fig5c": "Fig. 5c: ViT scale",
    "fig5d": "Fig. 5d: LLM scale",
    "fig8": "Fig. 8: LLMs and projector depth",
    "hr-study": "HR study: what high resolution and LR queries buy (phantom)",
}

# Base model and recipe per scale; the axes replace these fields.
BASE = {
    "cpu": {"recipe": "phantom-cpu", "vision": "vit-micro", "llm": "llm-tiny", "connector": "hilt"},
    "paper": {"recipe": "ctrate-llama3-8b", "vision": "vit-base", "llm": "llama3-8b", "connector": "hilt"},
}
DS_CONFIGS = {"zero2": "ds_configs/zero2.json", "zero3_qlora": "ds_configs/zero3_qlora.json"}


def projector_axis_ready() -> bool:
    """Whether ConnectorConfig has ``projector_layers`` yet (another change adds it)."""
    return "projector_layers" in {f.name for f in dataclasses.fields(ConnectorConfig)}


@dataclass
class RunSpec:
    """One training run of a sweep."""

    name: str  # directory name under the sweep's runs/
    group: str  # the name without the seed: runs of one group are aggregated over seeds
    axes: dict[str, str]  # axis -> value of this grid point
    seed: int
    recipe: str
    ds: str
    flags: dict[str, str]  # train.py flags (without --), e.g. {"vision": "vit-tiny"}
    sets: list[str] = field(default_factory=list)  # --set section.field=value
    pending: str | None = None  # why this run cannot run yet (then it is skipped, not failed)

    @property
    def resolution(self) -> str:
        """The run's resolution preset: its ``--resolution`` flag, else its recipe's."""
        from hilt_scale.recipes import recipe

        return self.flags.get("resolution") or recipe(self.recipe).resolution

    def train_args(self, out: str | Path) -> list[str]:
        """Arguments of ``hilt_scale/train.py`` for this run, writing into ``out``."""
        args = ["--ds", self.ds, "--recipe", self.recipe]
        for key, value in self.flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        for item in self.sets:
            args += ["--set", item]
        return [*args, "--seed", str(self.seed), "--out", str(out)]

    def command(self, out: str | Path) -> list[str]:
        """The subprocess command: ``python hilt_scale/train.py ...`` (run from the project root)."""
        return [sys.executable, "hilt_scale/train.py", *self.train_args(out)]


def parse_list(text: str | None) -> list[str] | None:
    """``"a,b,c"`` -> ["a", "b", "c"]; sizes are written DxHxW, so commas only separate values."""
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def grids_for(
    experiment: str | None, scale: str, given: dict[str, list[str] | None]
) -> list[dict[str, list[str]]]:
    """The grids of an experiment at a scale, with axes given on the command line replacing its
    values; without an experiment, the product of the given axes (one grid)."""
    given = {k: v for k, v in given.items() if v}
    if experiment is None:
        return [given or {"connector": [BASE[scale]["connector"]]}]
    if experiment not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {experiment!r}; expected one of {sorted(EXPERIMENTS)}")
    per_scale = EXPERIMENTS[experiment]
    if scale not in per_scale:
        raise ValueError(f"experiment {experiment!r} exists at scale(s) {sorted(per_scale)}, not {scale!r}")
    grids = []
    for grid in per_scale[scale]:
        grid = {axis: given.get(axis, values) for axis, values in grid.items()}
        # An axis given on the command line that the experiment does not vary: fixed for all runs.
        grids.append({**grid, **{a: v for a, v in given.items() if a not in grid}})
    return grids


def text_room_sets(flags: dict[str, str], sets: list[str], resolution: str) -> list[str]:
    """``max_length=N`` for a run whose connector gives the LLM more visual tokens than HILT would
    at the same settings (all-tokens; 2d at paper size), so that its prompt and report keep the
    room HILT has (N = max_length - HILT's tokens + the run's) instead of the trainer refusing the
    run. Nothing when ``--set max_length=...`` is given or the tokens fit; token counts from a
    meta-device build (``hilt_scale.info``)."""
    if any(item.split("=", 1)[0] == "max_length" for item in sets):
        return []
    from hilt_scale.info import inspect_model
    from hilt_scale.model.config import model_config

    model_sets = [item for item in sets if not item.startswith("llm.tokenizer_path=")]

    def tokens(connector: str) -> tuple[int, int]:
        cfg = model_config(flags["vision"], connector, flags["llm"], resolution, model_sets)
        return inspect_model(cfg, with_llm=False)["visual_tokens"], cfg.max_length

    try:
        (run_tokens, max_length), (hilt_tokens, _) = tokens(flags["connector"]), tokens("hilt")
    except (KeyError, ValueError):  # an invalid run: the plan and the run report it
        return []
    return [f"max_length={max_length - hilt_tokens + run_tokens}"] if run_tokens > hilt_tokens else []


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def expand(
    grids: list[dict[str, list[str]]],
    scale: str,
    seeds: list[int],
    flags: dict[str, str] | None = None,
    sets: list[str] | None = None,
    data: str | None = None,
) -> list[RunSpec]:
    """RunSpecs of the grids' union (duplicates dropped, order kept) times the seeds."""
    base = BASE[scale]
    specs: dict[str, RunSpec] = {}
    # Seed-major: every grid point's first seed runs before any second seed, so a partial sweep
    # already compares all points.
    for seed, grid in itertools.product(seeds, grids):
        axes = list(grid)
        for values in itertools.product(*(grid[a] for a in axes)):
            point = dict(zip(axes, values))
            group = "__".join(f"{a}-{_slug(v)}" for a, v in point.items()) or "base"
            run_flags = {k: v for k, v in base.items() if k != "recipe"}
            run_flags.update(flags or {})
            run_sets = list(sets or [])
            pending = None
            for axis, value in point.items():
                if axis in ("vision", "llm", "connector"):
                    run_flags[axis] = value
                elif axis in ("hr_size", "lr_size"):
                    run_sets.append(f"resolution.{axis}={value}")
                elif axis == "projector_layers":
                    run_sets.append(f"connector.projector_layers={value}")
                    if not projector_axis_ready():
                        pending = "connector.projector_layers is not in ConnectorConfig yet"
                else:
                    raise KeyError(f"unknown axis {axis!r}; expected one of {AXES}")
            recipe, ds = base["recipe"], DS_CONFIGS["zero2"]
            if scale == "paper" and run_flags["llm"] == "llama3-70b":
                recipe, ds = "ctrate-llama3-70b-qlora", DS_CONFIGS["zero3_qlora"]
            if run_flags.get("connector") == "random-queries":
                # Learned queries have no footprint: global keys whatever the recipe's HILT uses
                # (first, so a --set of the sweep still wins, or fails with its own error).
                run_sets.insert(0, "connector.keys=global")
            if data is not None:
                run_flags["data"] = data
            name = f"{group}__seed-{seed}"
            if name not in specs:
                spec = RunSpec(name, group, point, seed, recipe, ds, dict(run_flags), list(run_sets), pending)
                if not pending:
                    spec.sets += text_room_sets(spec.flags, spec.sets, spec.resolution)
                specs[name] = spec
    return list(specs.values())
