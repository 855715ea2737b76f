"""Train the HILT report model with DeepSpeed, from one CPU process to ZeRO-3 across nodes.

    deepspeed hilt_scale/train.py --ds ds_configs/zero2.json            # the main job (recipe phantom-cpu)
    deepspeed hilt_scale/train.py --ds ds_configs/zero3.json --recipe ctrate-llama3-8b --data SHARDS
    torchrun --nproc_per_node 2 hilt_scale/train.py --ds ds_configs/zero2.json
    python hilt_scale/train.py --ds ds_configs/zero2.json               # one process, no launcher
    python -m hilt_scale.train --help                                   # flags and recipes

Parse (a recipe, then flags over it), then run: hilt_scale.training.loop holds the loop.
"""

from hilt_scale.training.config import parse_args
from hilt_scale.training.distributed import exit_after_run
from hilt_scale.training.loop import run


def main(argv: list[str] | None = None) -> dict | None:
    """Parse the command line and run; the summary on rank 0, None elsewhere."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
    exit_after_run()  # a finished run: skip the interpreter's teardown (see its docstring)
