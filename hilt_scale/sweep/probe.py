"""Vision probe: can a connector's visual tokens carry each phantom finding, without the LLM?

    python -m hilt_scale.sweep.probe --out DIR [--variants hilt,lr-only,...] [--seeds 0,1,2]
        [--phantom-n 1000] [--phantom-seed 0] [--vision vit-micro-conv] [--resolution cpu-tiny]
        [--set connector.attn_scale=learned ...] [--readout max+mean|class-max|max] [--epochs 12]
        [--device auto]

The hr-study (``--experiment hr-study``) asks the whole model to write the findings; when a
variant fails there, the vision path and the language side are confounded. This trains, per
variant and seed, the same ViT and connector as the trainer (``vision_features``: the tokens the
LLM would get) with a linear head on the max and the mean over tokens (the trainer's finding head
reads the same; ``--readout class-max``: each kind's score per token, then its max; ``--readout
max``: the max alone, as rounds 1-2), directly on the phantom's per-volume
finding kinds (multi-label BCE, one logit per kind), and reports the validation ROC AUC per kind
and its mean over each physical group (``auc_hr_only``, ``auc_lr_visible``; 0.5 = chance), and for
the attention connectors the validation attention entropy (nats; log N_HR = uniform). Same
phantom (built once, as the sweep does, its physics labels at the resolution's HR/LR factor),
same budget for every variant. ``--set section.field=value`` changes the model config as the
trainer's ``--set`` does (``--set findings_loss=1 --set encoder_findings_loss=1`` adds the
trainer's encoder head and its loss). Per run ``DIR/probe/NAME.json`` (rerun = resume: one ``--out`` per
configuration), then ``DIR/probe_results.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hilt_scale.evaluation.scoring import roc_auc
from hilt_scale.model.config import CONNECTOR_KINDS, grid, lr_factor, model_config, shard_dtype
from hilt_scale.model.connectors import build_connector
from hilt_scale.model.findings import FINDING_READOUTS, FindingHead
from hilt_scale.model.visual import build_vision, vision_features
from hilt_scale.sweep.grid import parse_list
from hilt_scale.sweep.study import mean_std
from shards.io import write_json_atomic, write_text_atomic
from shards.phantom_report import HR_ONLY_KINDS, KINDS, LR_VISIBLE_KINDS

KIND_NAMES: tuple[str, ...] = tuple(KINDS)
GROUPS = {"auc_hr_only": HR_ONLY_KINDS, "auc_lr_visible": LR_VISIBLE_KINDS}
READOUTS = (*FINDING_READOUTS, "max")


def load_split(shard_set: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes [N, 1, D, H, W] (as stored) and finding-kind labels [N, len(KINDS)] of one split.

    Needs phantom shards: each sample's json must hold ``findings`` with their ``kind``.
    """
    volumes, labels = [], []
    for i, j in shard_set.entries(split):
        sample = shard_set.read(i, j)
        findings = sample["meta"].get("findings")
        if findings is None:
            raise ValueError(
                f"{shard_set.root}: sample {sample['key']} has no 'findings' in its json; "
                "the probe needs phantom shards (ground-truth finding kinds)"
            )
        kinds = {f["kind"] for f in findings}
        volumes.append(torch.from_numpy(np.array(sample["hr"])))  # a writable copy
        labels.append([k in kinds for k in KIND_NAMES])
    return torch.stack(volumes)[:, None], torch.tensor(labels, dtype=torch.float32)


class VisionProbe(nn.Module):
    """ViT + connector (the trainer's visual path) + a linear head on the visual tokens' max and
    mean (``readout="max+mean"``, the trainer's finding head) or their max alone (round 1-2)."""

    def __init__(
        self,
        vision: str,
        connector: str,
        resolution: str,
        llm: str = "llm-tiny",
        sets: list[str] | None = None,
        readout: str = "max+mean",
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r}; expected one of {READOUTS}")
        self.readout = readout
        self.cfg = model_config(
            vision=vision, connector=connector, llm=llm, resolution=resolution, overrides=sets
        )
        width = self.cfg.llm.hidden_size
        self.vision = build_vision(self.cfg)
        self.connector = build_connector(self.cfg.connector, self.cfg.vision.width, width)
        if readout == "max":
            self.head = nn.Linear(width, len(KIND_NAMES))
        else:
            self.head = FindingHead(width, len(KIND_NAMES), readout)
        # --set findings_loss=1 --set encoder_findings_loss=W: the trainer's encoder head, its loss
        # weighted W / findings_loss beside the head's (HiltReportModel.vision_loss).
        self.encoder_head = self.encoder_weight = None
        if self.cfg.encoder_findings_loss > 0:
            self.encoder_weight = self.cfg.encoder_findings_loss / self.cfg.findings_loss
            self.encoder_head = FindingHead(
                self.cfg.vision.width, len(KIND_NAMES), "max+mean" if readout == "max" else readout
            )

    @property
    def visual_tokens(self) -> int:
        res, patch = self.cfg.resolution, self.vision.patch_size
        return self.connector.num_tokens(grid(res.hr_size, patch), grid(res.lr_size, patch))

    def forward(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's logits, and the encoder head's (None without one)."""
        res = self.cfg.resolution
        z_hr, z_lr, hr_grid = vision_features(self.vision, self.connector, hr, res.lr_size, res.lr_view)
        tokens = self.connector(z_hr, z_lr, hr_grid).float()
        logits = self.head(tokens.amax(dim=1) if self.readout == "max" else tokens)
        if self.encoder_head is None:
            return logits, None
        return logits, self.encoder_head((z_hr if z_hr is not None else z_lr).float())

    def loss(self, hr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Multi-label BCE of the head (+ the encoder head's, weighted as the trainer does)."""
        logits, encoder = self(hr)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if encoder is not None:
            loss = loss + self.encoder_weight * F.binary_cross_entropy_with_logits(encoder, labels)
        return loss


def run_probe(
    variant: str,
    seed: int,
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    *,
    vision: str = "vit-micro-conv",
    resolution: str = "cpu-tiny",
    sets: list[str] | None = None,
    readout: str = "max+mean",
    epochs: int = 12,
    batch: int = 8,
    lr: float = 1e-3,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one probe, return validation AUC per kind and per group, the loss curve and the time."""
    torch.manual_seed(seed)
    model = VisionProbe(vision, variant, resolution, sets=sets, readout=readout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    (xt, yt), (xv, yv) = train, valid
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    model.train()
    for _ in range(epochs):
        perm, total = torch.randperm(len(xt), generator=gen), 0.0
        for b in range(0, len(xt), batch):
            idx = perm[b : b + batch]
            loss = model.loss(xt[idx].to(device), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
    model.eval()
    attends = hasattr(model.connector, "record_entropy")
    if attends:
        model.connector.record_entropy = True
    probs, entropies = [], []
    with torch.no_grad():
        for b in range(0, len(xv), batch):
            probs.append(torch.sigmoid(model(xv[b : b + batch].to(device))[0]).cpu())
            if attends:
                entropies.append(model.connector.last_entropy)
    probs = torch.cat(probs)
    per_kind = {k: roc_auc(yv[:, i].numpy(), probs[:, i].numpy()) for i, k in enumerate(KIND_NAMES)}
    out: dict[str, Any] = {"variant": variant, "seed": seed, "visual_tokens": model.visual_tokens}
    for name, kinds in GROUPS.items():
        vals = [per_kind[k] for k in kinds if not np.isnan(per_kind[k])]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    scale = getattr(model.connector, "scale", None)
    out.update(
        attn_entropy=float(np.mean(entropies)) if entropies else None,
        attn_scale=float(scale) if scale is not None else None,
        auc_per_kind=per_kind,
        positives={k: int(yv[:, i].sum()) for i, k in enumerate(KIND_NAMES)},
        train_loss=losses,
        steps=epochs * -(-len(xt) // batch),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return out


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per variant: visual tokens, seeds, mean/std over seeds of the group AUCs and each kind's."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for variant, rs in by.items():
        out[variant] = {
            "visual_tokens": rs[0]["visual_tokens"],
            "seeds": [r["seed"] for r in rs],
            **{g: mean_std([r[g] for r in rs]) for g in GROUPS},
            "attn_entropy": mean_std(
                [r.get("attn_entropy") for r in rs if r.get("attn_entropy") is not None]
            ),
            "auc_per_kind": {k: mean_std([r["auc_per_kind"][k] for r in rs]) for k in KIND_NAMES},
        }
    return out


def probe_markdown(summary: dict) -> str:
    """Table: one row per variant, group AUCs then each kind's AUC (mean ± std over seeds)."""

    def cell(d: dict) -> str:
        return f"{d['mean']:.2f} ± {d['std']:.2f}" if d.get("n") else "n/a"

    short = {k: k.replace(" calcification", " calc.").replace(" effusion", " eff.") for k in KIND_NAMES}
    head = ["variant", "visual tokens", "seeds", "attn entropy", "AUC HR-only", "AUC LR-visible"]
    head += [f"{short[k]}{' (HR-only)' if k in HR_ONLY_KINDS else ''}" for k in KIND_NAMES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, v in summary.items():
        row = [variant, str(v["visual_tokens"]), str(len(v["seeds"])), cell(v["attn_entropy"])]
        row += [cell(v[g]) for g in GROUPS] + [cell(v["auc_per_kind"][k]) for k in KIND_NAMES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hilt_scale.sweep.probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", default="hilt,lr-only,random-queries,all-tokens,pooled,2d")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", help="a phantom shard set to use instead of building one under --out")
    p.add_argument("--phantom-n", type=int, default=1000, help="phantom volumes")
    p.add_argument("--valid-fraction", type=float, default=0.2)
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--vision", default="vit-micro-conv")
    p.add_argument("--resolution", default="cpu-tiny")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a model config field, e.g. --set connector.attn_scale=learned (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--readout", choices=READOUTS, default="max+mean",
        help="the head reads the tokens' max and mean (the trainer's finding head) or their max alone",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    a = p.parse_args(argv)
    variants = parse_list(a.variants)
    bad = [v for v in variants if v not in CONNECTOR_KINDS]
    if bad:
        p.error(f"unknown variants {bad}; expected some of {CONNECTOR_KINDS}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    from shards.read import open_shard_set

    if a.data:
        data = a.data
    else:
        from hilt_scale.sweep.execute import build_phantom_shards

        cfg = model_config(vision=a.vision, resolution=a.resolution, overrides=a.sets)
        data = build_phantom_shards(
            a.out,
            a.phantom_n,
            cfg.resolution.hr_size,
            a.phantom_seed,
            a.valid_fraction,
            lr_factor=lr_factor(cfg.resolution),
            dtype=shard_dtype(cfg.vision),
        )
    shard_set = open_shard_set(data)
    train, valid = load_split(shard_set, "train"), load_split(shard_set, "valid")
    print(
        f"probe data {data}: {len(train[0])} train / {len(valid[0])} valid volumes, device {device}",
        flush=True,
    )
    runs = []
    for seed in (int(s) for s in parse_list(a.seeds)):
        for variant in variants:
            path = a.out / "probe" / f"{variant}__seed-{seed}.json"
            if path.exists():
                runs.append(json.loads(path.read_text()))
                continue
            r = run_probe(
                variant, seed, train, valid, vision=a.vision, resolution=a.resolution, sets=a.sets,
                readout=a.readout, epochs=a.epochs, batch=a.batch, lr=a.lr, device=device,
            )  # fmt: skip
            r.update(
                vision=a.vision, resolution=a.resolution, sets=a.sets, readout=a.readout, data=str(data),
                device=device,
            )  # fmt: skip
            write_json_atomic(path, r)
            runs.append(r)
            print(
                f"{variant} seed {seed}: AUC HR-only {r['auc_hr_only']:.3f} LR-visible {r['auc_lr_visible']:.3f} "
                f"small nodule {r['auc_per_kind']['small nodule']:.3f} entropy {r['attn_entropy']} "
                f"({r['seconds']:.0f} s, {r['steps']} steps)",
                flush=True,
            )
    summary = summarize(runs)
    write_json_atomic(a.out / "probe_results.json", {"variants": summary, "runs": runs})
    table = probe_markdown(summary)
    write_text_atomic(a.out / "probe_results.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
