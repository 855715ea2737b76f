"""Issue 22, round 11 (docs/SWEEPS.md): the vision probe with an encoder finding head, evaluated
every 3 epochs (the probe command itself, ``--set findings_loss=1 --set encoder_findings_loss=W``,
reports only the end).

    python docs/scripts/encoder_head_probe.py SHARD_DIR VARIANT SEED WEIGHT EPOCHS

Prints per kind the validation AUC of (the connector's head, the encoder head)."""

import json
import sys
import time

import torch
import torch.nn.functional as F

from hilt_scale.evaluation.scoring import roc_auc
from hilt_scale.model.findings import FindingHead
from hilt_scale.model.visual import vision_features
from hilt_scale.sweep.probe import KIND_NAMES, VisionProbe, load_split
from shards.read import open_shard_set

torch.set_num_threads(1)

data, variant, seed, weight, epochs = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
sets = ["vision.input=window+contrast+calcium", "vision.calcium=highpass"] + (
    ["connector.keys=footprint"] if variant == "hilt" else []
)
ss = open_shard_set(data)
xt, yt = load_split(ss, "train")
xv, yv = load_split(ss, "valid")
torch.manual_seed(seed)
model = VisionProbe("vit-micro-conv", variant, "cpu-tiny", sets=sets)
enc_head = FindingHead(model.cfg.vision.width, len(KIND_NAMES))
opt = torch.optim.AdamW(list(model.parameters()) + list(enc_head.parameters()), lr=1e-3, weight_decay=0.0)
gen = torch.Generator().manual_seed(seed)
res = model.cfg.resolution


def fwd(x):
    z_hr, z_lr, g = vision_features(model.vision, model.connector, x, res.lr_size, res.lr_view)
    tokens = model.connector(z_hr, z_lr, g).float()
    enc = z_hr if z_hr is not None else z_lr
    return model.head(tokens), enc_head(enc.float())


def evaluate(step):
    model.eval()
    with torch.no_grad():
        outs = [fwd(xv[b : b + 16]) for b in range(0, len(xv), 16)]
    a = torch.cat([o[0] for o in outs])
    e = torch.cat([o[1] for o in outs])
    row = {"step": step}
    for i, k in enumerate(KIND_NAMES):
        row[k] = (
            round(roc_auc(yv[:, i].numpy(), a[:, i].numpy()), 3),
            round(roc_auc(yv[:, i].numpy(), e[:, i].numpy()), 3),
        )
    print(json.dumps(row), flush=True)
    model.train()


step, t0 = 0, time.time()
for ep in range(epochs):
    perm = torch.randperm(len(xt), generator=gen)
    for b in range(0, len(xt), 8):
        idx = perm[b : b + 8]
        a, e = fwd(xt[idx])
        loss = F.binary_cross_entropy_with_logits(a, yt[idx]) + weight * F.binary_cross_entropy_with_logits(
            e, yt[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    if ep % 3 == 2:
        evaluate(step)
        print("t", round(time.time() - t0), flush=True)
