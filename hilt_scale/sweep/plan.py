"""``--plan``: per run, the ds_config, a per-GPU memory estimate, GPUs / nodes and launch commands.

Memory per GPU (an estimate, documented in docs/SWEEPS.md) =
  model states of the TRAINABLE parameters (ViT + connector + LoRA) from DeepSpeed's own ZeRO
  estimators (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``,
  the functions behind ``..._all_cold``, called with the run's offload settings)
  + the frozen LLM base's bytes (bf16, or 4-bit nf4 for Linear weights), replicated under ZeRO-2
    and divided by the GPU count under ZeRO-3
  + activations at the run's token counts, 34 bytes per token per hidden unit per layer
    (Korthikanti et al. 2022, bf16, flash/SDPA attention so no s^2 term) for the ViT's HR and LR
    passes and the LLM's sequence, plus fp32 logits
  + 2 GB for the CUDA context, communication buffers and allocator slack.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from hilt_scale.sweep.grid import RunSpec

GB = 1e9
OVERHEAD_BYTES = 2 * GB
ROOT = Path(__file__).resolve().parents[2]


@cache
def _counts(vision: str, connector: str, llm: str, resolution: str, sets: tuple[str, ...]) -> dict[str, Any]:
    """Parameter and token counts of one model config, on the meta device (hilt_scale.info)."""
    from hilt_scale.info import _frozen_weight_bytes, _meta_llm, inspect_model
    from hilt_scale.model.config import model_config

    cfg = model_config(vision, connector, llm, resolution, list(sets))
    out = inspect_model(cfg, with_llm=False)
    meta = _meta_llm(cfg)
    lora = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    out.update(
        llm_trainable=lora,
        frozen_bytes=_frozen_weight_bytes(meta, cfg),
        largest_param=max(p.numel() for p in meta.parameters()),
        llm_hidden=cfg.llm.hidden_size,
        llm_layers=cfg.llm.num_layers,
        vocab=cfg.llm.vocab_size,
        vit_width=cfg.vision.width,
        vit_depth=cfg.vision.depth,
        max_length=cfg.max_length,
        quantization=cfg.llm.quantization,
        dtype=cfg.llm.dtype,
    )
    out["trainable"] = out["trainable_params"] + lora
    return out


def _zero(ds: str) -> tuple[int, bool, bool]:
    """(stage, optimizer offload, parameter offload) of a DeepSpeed JSON."""
    z = json.loads((ROOT / ds).read_text()).get("zero_optimization", {})
    return int(z.get("stage", 0)), "offload_optimizer" in z, "offload_param" in z


def memory_per_gpu(c: dict, ds: str, gpus: int, gpus_per_node: int, micro_batch: int) -> dict[str, float]:
    """The estimate's parts in bytes for ``gpus`` GPUs (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage, off_opt, off_param = _zero(ds)
    per_node, nodes = min(gpus, gpus_per_node), math.ceil(gpus / gpus_per_node)
    if stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(
            c["trainable"],
            c["largest_param"],
            per_node,
            nodes,
            cpu_offload=off_opt,
            cpu_offload_params=off_param,
        )
        frozen = c["frozen_bytes"] / gpus
    else:
        _, states = estimate_zero2_model_states_mem_needs(
            c["trainable"], per_node, nodes, cpu_offload=off_opt
        )
        frozen = c["frozen_bytes"]
    seq = max(c["max_length"], c["visual_tokens"] + 256)  # prompt + visual tokens + report
    vit_tokens = c["hr_tokens"] + c["lr_tokens"]
    act = micro_batch * (
        34 * c["vit_width"] * vit_tokens * c["vit_depth"]
        + 34 * c["llm_hidden"] * seq * c["llm_layers"]
        + 4 * seq * c["vocab"]
    )
    total = states + frozen + act + OVERHEAD_BYTES
    return {"model_states": states, "frozen_base": frozen, "activations": act, "total": total, "stage": stage}


def plan_run(
    spec: RunSpec,
    out: Path,
    gpus_per_node: int = 8,
    gpu_gb: float = 80.0,
    micro_batch: int = 1,
    total_batch: int = 4,
) -> dict[str, Any]:
    """One row of the plan: memory estimate, GPUs and nodes needed, launch commands."""
    row: dict[str, Any] = {"run": spec.name, "axes": spec.axes, "recipe": spec.recipe, "ds_config": spec.ds}
    if spec.pending:
        return {**row, "status": "pending", "reason": spec.pending}
    f = spec.flags
    try:
        c = _counts(f["vision"], f["connector"], f["llm"], spec.resolution, tuple(spec.sets))
    except (KeyError, ValueError) as exc:
        return {**row, "status": "invalid", "reason": str(exc)}
    # The most GPUs the batch allows: total batch = micro x accumulation x GPUs.
    options = [g for g in (1, 2, 4, 8, 16, 32, 64) if total_batch % (micro_batch * g) == 0] or [1]
    chosen, mem = options[-1], None
    for g in options:
        mem = memory_per_gpu(c, spec.ds, g, gpus_per_node, micro_batch)
        chosen = g
        if mem["total"] <= gpu_gb * GB:
            break
    assert mem is not None
    nodes = math.ceil(chosen / gpus_per_node)
    per_node = min(chosen, gpus_per_node)
    args = " ".join(spec.train_args(out / "runs" / spec.name))
    row.update(
        status="planned",
        zero_stage=mem["stage"],
        quantization=c["quantization"],
        llm_dtype=c["dtype"],
        visual_tokens=c["visual_tokens"],
        trainable_params=c["trainable"],
        frozen_base_gb=round(c["frozen_bytes"] / GB, 2),
        mem_gb={k: round(v / GB, 1) for k, v in mem.items() if k != "stage"},
        fits=mem["total"] <= gpu_gb * GB,
        gpus=chosen,
        nodes=nodes,
        launch=f"deepspeed --num_gpus {per_node} hilt_scale/train.py {args}",
        launch_multinode=(
            f"deepspeed --hostfile hostfile --num_nodes {nodes} --num_gpus {per_node} "
            f"--master_addr HOST0 --master_port 29611 hilt_scale/train.py {args}"
        ),
    )
    return row


def plan_markdown(rows: list[dict], gpu_gb: float) -> str:
    """The plan as a Markdown table plus the launch commands."""
    head = "| run | ds_config | ZeRO | LLM weights | visual tokens | trainable | model states | frozen base | activations | total / GPU | fits {g:.0f} GB | GPUs (nodes) |"
    lines = [head.format(g=gpu_gb), "|" + "---|" * 12]
    for r in rows:
        if r["status"] != "planned":
            lines.append(
                f"| {r['run']} | {Path(r['ds_config']).name} | {r['status']}: {r['reason']} |" + " |" * 9
            )
            continue
        m = r["mem_gb"]
        weights = (
            "4-bit nf4"
            if r["quantization"] == "nf4"
            else {"bfloat16": "bf16"}.get(r["llm_dtype"], r["llm_dtype"])
        )
        lines.append(
            f"| {r['run']} | {Path(r['ds_config']).name} | {r['zero_stage']} | {weights} | {r['visual_tokens']} "
            f"| {r['trainable_params'] / 1e6:.0f} M | {m['model_states']} GB | {m['frozen_base']} GB "
            f"| {m['activations']} GB | **{m['total']} GB** | {'yes' if r['fits'] else 'no'} | {r['gpus']} ({r['nodes']}) |"
        )
    lines.append("")
    for r in rows:
        if r["status"] == "planned":
            lines += [f"`{r['run']}`:", "```bash", r["launch"], r["launch_multinode"], "```"]
    return "\n".join(lines)
