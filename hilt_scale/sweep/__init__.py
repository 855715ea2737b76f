"""Scaling sweeps and the paper's experiments as one command: ``python -m hilt_scale.sweep``.

grid.py (axes, named experiments, RunSpec), plan.py (``--plan``: ds_config, memory per GPU,
GPUs/nodes, launch commands), execute.py (``--run``: subprocess per run, resume, table, figure),
study.py (the phantom hr-study: finding F1 on HR-only vs LR-visible findings). docs/SWEEPS.md.
"""
