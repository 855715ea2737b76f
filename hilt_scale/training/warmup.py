"""Vision warm-up (``--vision-warmup-steps N``): before the whole model trains, N optimizer steps
of the vision path alone (ViT, connector, finding head) on the finding loss.

Why: in the main job the encoder learns from the finding loss only (``vision_lm_grad=false``),
and a one-voxel finding needs more steps than the LLM needs to learn the reports. A vision step
costs about a third of a full step (no LLM), so the encoder gets its steps cheaply. Same data
(its own shuffle, so the main phase's data order is the one it would be without the warm-up),
same batch and learning rate (constant, AdamW, clipping 1.0), a plain torch optimizer on the plain
module before DeepSpeed wraps it; with several ranks the gradients are averaged. A resumed run
skips it: its checkpoint holds the warmed weights. Logged as ``vision_warmup`` in summary.json.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hilt_scale.model.visual import vision_features
from hilt_scale.training.config import TrainConfig
from hilt_scale.training.distributed import grad_accum
from hilt_scale.training.loop import Batches, next_batch, nonempty


def vision_modules(model: Any) -> list[torch.nn.Module]:
    """The modules the warm-up trains: the encoder, the connector and the finding head."""
    return [m for m in (model.vision, model.connector, model.finding_head, model.encoder_head) if m is not None]


def warm_up_vision(model: Any, cfg: TrainConfig, data_path: str, rank: int, world: int, say: Any) -> dict:
    """Train the vision path of ``model`` (not yet wrapped by DeepSpeed) for
    ``cfg.vision_warmup_steps`` steps on the finding loss; return its log for summary.json."""
    import torch.distributed as dist

    from shards.read import ShardLoader

    steps = cfg.vision_warmup_steps
    if model.finding_head is None or not model.cfg.findings_loss > 0:
        raise ValueError(
            f"--vision-warmup-steps {steps} trains the finding head's loss: set findings_loss > 0 "
            f"(now {model.cfg.findings_loss})"
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    modules = vision_modules(model)
    for module in modules:
        module.to(device).train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    loader = ShardLoader(
        data_path, split="train", batch_size=cfg.micro_batch, shuffle=True, seed=cfg.seed + 1,
        rank=rank, world_size=world, num_workers=cfg.num_workers, collate_fn=nonempty(model.collator()),
        on_error=cfg.on_error,
    )  # fmt: skip
    batches, accum = Batches(loader), grad_accum(cfg, world)
    t0, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        total = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next_batch(batches)
            res = model.cfg.resolution
            z_hr, z_lr, hr_grid = vision_features(
                model.vision, model.connector, batch["hr"].to(device), res.lr_size, res.lr_view
            )
            logits = model.finding_logits(model.connector(z_hr, z_lr, hr_grid))
            loss = model.vision_loss(logits, z_hr, z_lr, batch) / accum
            loss.backward()
            total += model.last_findings_loss / accum  # the finding head's part, as in training
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
            dist.all_reduce(total)
            total /= world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
        if step % 100 == 0 or step == steps:
            say(f"vision warm-up step {step}/{steps}: findings_loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    window = max(1, steps // 10)
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "findings_loss_first": round(sum(losses[:window]) / window, 4),  # mean of the first 10% of steps
        "findings_loss_last": round(sum(losses[-window:]) / window, 4),  # and of the last 10%
        "skipped": dict(loader.skipped),
    }
