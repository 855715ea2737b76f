"""The training run's configuration (everything besides the model) and its command line.

A run starts from a named recipe (``hilt_scale.recipes``: a function returning a whole
TrainConfig), then every flag given on the command line overrides that field; ``--set`` adds model
overrides after the recipe's own. Nothing else changes a default: no flag depends on another.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("HILT_SCALE_CACHE", Path.home() / ".cache" / "hilt-scale"))


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs besides the model config; every field is a CLI flag.

    The field defaults are the paper's optimisation (AdamW 1e-4, linear schedule, warm-up 0.03,
    total batch 4); the recipes set the rest.
    """

    recipe: str = "phantom-cpu"
    ds: str = "ds_configs/zero2.json"
    data: str | None = None  # shard set; None = the embedded phantom default
    eval_data: str | None = None  # shard set to evaluate on (zero-shot transfer); default = --data
    # "auto" = "test" when the eval shard set's index lists a test split (CT-RATE's patient split),
    # else "valid"; the split used is recorded in summary.json. Periodic evaluations during
    # training (--eval-every: model selection) use "valid" when the final one uses "test".
    eval_split: str = "auto"
    out: str = "runs/main"
    cache: str = str(DEFAULT_CACHE)
    resume: bool = False
    resume_tag: str = ""  # --resume from this checkpoint tag (e.g. step00000004) instead of LATEST
    allow_change: list[str] = field(default_factory=list)  # schedule fields --resume may change
    # Model presets and section.field=value overrides (hilt_scale.model.config).
    vision: str = "vit-micro"
    connector: str = "hilt"
    llm: str = "llm-tiny"
    resolution: str = "cpu-tiny"
    set: list[str] = field(default_factory=list)
    # Optimisation (paper: AdamW 1e-4, linear schedule, warm-up 0.03, total batch 4 = 2 x 2).
    micro_batch: int = 2
    total_batch: int = 4
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans them)
    # Steps of the vision path alone (ViT, connector, finding head) on the finding loss before the
    # whole model trains (training/warmup.py); needs findings_loss > 0. 0 = none (the paper).
    vision_warmup_steps: int = 0
    seed: int = 0
    num_workers: int = 0
    # Checkpoint / evaluation cadence in optimizer steps (0 = only at the end).
    save_every: int = 0
    eval_every: int = 0
    eval_batch: int = 4
    eval_limit: int = 0  # evaluate on at most this many volumes (0 = all)
    # None = from the data: the 99th percentile of training report lengths in the model's tokens,
    # capped by the sequence budget (prompt + visual tokens + report <= ModelConfig.max_length).
    max_new_tokens: int | None = None
    num_beams: int = 1
    # Local CT-CLIP RadBERT classifier directory (docs/EVALUATION.md): clinical efficacy also with
    # the field's classifier, beside the rule-based labeler; None = the labeler alone.
    ce_model: str | None = None
    keep_checkpoints: int = 2
    eval: bool = True  # --no-eval: skip evaluation (and the baseline) entirely
    export: bool = True
    # Bad samples (unreadable volume, ...) in training and evaluation: "raise" stops with an error
    # naming the file and key; "skip" leaves them out and counts them by reason in summary.json.
    on_error: str = "raise"
    trace_keys: bool = False  # write keys.rank{r}.json: the sample keys each rank trained on, in order
    # Embedded default: phantom size.
    phantom_n: int = 240
    phantom_size: str = ""  # D,H,W; empty = the resolution preset's HR size
    local_rank: int = -1  # appended by the deepspeed launcher


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (``--micro-batch`` and ``--micro_batch``), all defaulting to unset."""
    from hilt_scale.recipes import RECIPES

    lines = [f"  {name:26s} {fn.__doc__.strip().splitlines()[0]}" for name, fn in RECIPES.items()]
    p = argparse.ArgumentParser(
        description="Train the HILT report model with DeepSpeed (see hilt_scale/train.py).",
        epilog="recipes (--recipe NAME; flags override its fields):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = {bool: bool, int: int, float: float, int | None: int}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "--" + f.name] if "_" in f.name else [flag]
        if f.type is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "set":
            p.add_argument(
                "--set", dest="set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                help="override a model config field, e.g. --set llm.lora_r=16 (repeatable; after the recipe's)",
            )  # fmt: skip
        elif f.name == "allow_change":
            p.add_argument(
                "--allow-change", "--allow_change", dest=f.name, action="append", default=None, metavar="KEY",
                help="let --resume accept a changed lr / warmup_ratio / max_steps / epochs (repeatable)",
            )  # fmt: skip
        elif f.name == "on_error":
            p.add_argument(*names, dest=f.name, choices=("raise", "skip"), default=None)
        elif f.name == "recipe":
            p.add_argument("--recipe", dest="recipe", choices=sorted(RECIPES), default=None)
        else:
            p.add_argument(*names, dest=f.name, type=kinds.get(f.type, str), default=None)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The recipe named by ``--recipe`` (default phantom-cpu), then every flag given over it."""
    from hilt_scale.recipes import recipe

    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    cfg = recipe(given.pop("recipe", TrainConfig.recipe))
    extra_sets = given.pop("set", [])
    return dataclasses.replace(cfg, **given, set=[*cfg.set, *extra_sets])
