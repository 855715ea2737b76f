"""Issue 22, round 11 (docs/SWEEPS.md): where along HILT's visual path is the small nodule lost?

    python docs/scripts/stage_probe.py SHARD_DIR SEED [section.field=value ...]   (int16 phantom shards)

Trains the vision probe's HILT (the hr-study's input, footprint keys, max+mean head) and every 200
steps fits a logistic regression on the max and mean over tokens of each stage (stem, patch
embedding, ViT output, LR queries, attention output, projector output) on 400 training volumes,
and prints the validation AUC of small and large nodules per stage and of the trained head."""

import json
import sys
import time

import torch
import torch.nn.functional as F

from hilt_scale.evaluation.scoring import roc_auc
from hilt_scale.model.attention import footprint_attention
from hilt_scale.model.visual import lr_view, vision_input
from hilt_scale.model.vit3d import input_channels
from hilt_scale.sweep.probe import KIND_NAMES, VisionProbe, load_split
from shards.read import open_shard_set

torch.set_num_threads(1)

data, seed = sys.argv[1], int(sys.argv[2])
extra = sys.argv[3:]  # more --set style overrides
sets = ["vision.input=window+contrast+calcium", "vision.calcium=highpass", "connector.keys=footprint"] + extra
ss = open_shard_set(data)
xt, yt = load_split(ss, "train")
xv, yv = load_split(ss, "valid")
SN = [i for i, k in enumerate(KIND_NAMES) if "nodule" in k]
torch.manual_seed(seed)
model = VisionProbe("vit-micro-conv", "hilt", "cpu-tiny", sets=sets)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
gen = torch.Generator().manual_seed(seed)
vis, con = model.vision, model.connector
res = model.cfg.resolution


def stages(hr):
    # vision_features for hilt, keeping every stage
    x = vision_input(hr, vis.cfg)
    lr = vision_input(lr_view(hr.float(), res.lr_size, res.lr_view).round().to(hr.dtype), vis.cfg)

    def run(v):
        c = input_channels(v, vis.cfg.input, vis.cfg.calcium)
        s = vis.stem(c)
        e = vis.patch_embed(s) + vis.pos_embed_for(vis.grid_of(v.shape[-3:]))
        h = e
        for b in vis.blocks:
            h = b(h)
        return s, e, vis.norm(h)

    s, e, h = run(x)
    _, _, q = run(lr)
    a = footprint_attention(q, h, vis.grid_of(x.shape[-3:]), con.scale, con.heads)
    p = con.projector(a)
    return dict(stem=s, embed=e, vit=h, lrq=q, attn=a, proj=p)


def pooled(x, n):
    feats = {}
    with torch.no_grad():
        for b in range(0, n, 16):
            st = stages(x[b : b + 16])
            for k, v in st.items():
                feats.setdefault(k, []).append(torch.cat([v.amax(1), v.mean(1)], -1))
    return {k: torch.cat(v) for k, v in feats.items()}


def logreg_auc(ft, ytr, fv, yva):
    mu, sd = ft.mean(0), ft.std(0) + 1e-6
    ft, fv = (ft - mu) / sd, (fv - mu) / sd
    w = torch.zeros(ft.shape[1], requires_grad=True)
    b0 = torch.zeros(1, requires_grad=True)
    o = torch.optim.LBFGS([w, b0], max_iter=300)

    def clo():
        o.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ft @ w + b0, ytr) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    o.step(clo)
    with torch.no_grad():
        return roc_auc(yva.numpy(), (fv @ w + b0).numpy())


def evaluate(step):
    model.eval()
    with torch.no_grad():
        st = stages(xv[:4])
        ref = model(xv[:4])[0]
        chk = model.head(torch.cat([st["proj"].amax(1), st["proj"].mean(1)], -1))
        assert torch.allclose(ref, chk, atol=1e-4), (ref - chk).abs().max()
    ft = pooled(xt[:400], 400)
    fv = pooled(xv, len(xv))
    row = {"step": step}
    with torch.no_grad():
        logits = torch.cat([model(xv[b : b + 16])[0] for b in range(0, len(xv), 16)])
    for i in SN:
        k = KIND_NAMES[i]
        row[k] = {st: round(logreg_auc(ft[st], yt[:400, i], fv[st], yv[:, i]), 3) for st in ft}
        row[k]["head"] = round(roc_auc(yv[:, i].numpy(), logits[:, i].numpy()), 3)
    print(json.dumps(row), flush=True)
    model.train()


step, t0 = 0, time.time()
evaluate(0)
for ep in range(12):
    perm = torch.randperm(len(xt), generator=gen)
    for b in range(0, len(xt), 8):
        idx = perm[b : b + 8]
        loss = F.binary_cross_entropy_with_logits(model(xt[idx])[0], yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    if ep % 2 == 1:
        evaluate(step)
        print("t", round(time.time() - t0), flush=True)
