"""The vision probe (``python -m hilt_scale.sweep.probe``): its AUC against scipy's Mann-Whitney U,
that it learns a finding the ViT can see (cardiomegaly) from a small phantom, and its CLI outputs."""

import json

import numpy as np
import pytest
import torch

from hilt_scale.sweep import probe
from hilt_scale.sweep.execute import build_phantom_shards
from shards.phantom_report import HR_ONLY_KINDS, KINDS
from shards.read import open_shard_set


def test_auc_is_mann_whitney_u_over_pairs():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if labels.all() or not labels.any():
            labels[0] = not labels[0]
        ties = trial % 2 == 1
        scores = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
        u = stats.mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided").statistic
        assert probe.roc_auc(labels, scores) == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)
    assert probe.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert probe.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert np.isnan(probe.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    return out, build_phantom_shards(out, 160, (32, 64, 64), 0, valid_fraction=0.3, log=lambda *_: None)


def test_probe_learns_a_finding_the_vit_sees(small_phantom):
    """Cardiomegaly (the heart 1.35x wider) is visible at LR; 10 epochs of lr-only on 112 volumes
    must rank the validation volumes well above chance."""
    _, data = small_phantom
    shard_set = open_shard_set(data)
    train, valid = probe.load_split(shard_set, "train"), probe.load_split(shard_set, "valid")
    assert train[0].shape[1:] == (1, 32, 64, 64) and train[1].shape[1] == len(KINDS)
    r = probe.run_probe("lr-only", 0, train, valid, epochs=10)
    assert r["visual_tokens"] == 64 and r["steps"] == 10 * -(-len(train[0]) // 8)
    assert r["auc_per_kind"]["cardiomegaly"] >= 0.8, r["auc_per_kind"]
    assert r["train_loss"][-1] < r["train_loss"][0]
    hr_only = [r["auc_per_kind"][k] for k in HR_ONLY_KINDS if not np.isnan(r["auc_per_kind"][k])]
    assert r["auc_hr_only"] == pytest.approx(float(np.mean(hr_only)))


def test_probe_cli_writes_results_and_resumes(small_phantom, capsys):
    out, data = small_phantom
    args = ["--out", str(out / "cli"), "--data", data, "--variants", "hilt,pooled", "--seeds", "0,1"]
    args += ["--epochs", "1"]
    assert probe.main(args) == 0
    results = json.loads((out / "cli" / "probe_results.json").read_text())
    assert set(results["variants"]) == {"hilt", "pooled"} and len(results["runs"]) == 4
    hilt = results["variants"]["hilt"]
    assert hilt["visual_tokens"] == 64 and hilt["seeds"] == [0, 1]
    assert all(r["readout"] == "max+mean" for r in results["runs"])  # the trainer's finding head
    table = (out / "cli" / "probe_results.md").read_text()
    assert table.count("\n| hilt |") == 1 and "(HR-only)" in table
    run = out / "cli" / "probe" / "hilt__seed-1.json"
    stamp = run.stat().st_mtime_ns
    capsys.readouterr()
    assert probe.main(args) == 0  # resume: nothing retrained
    assert run.stat().st_mtime_ns == stamp and "seed 1: AUC" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        probe.main(["--out", str(out / "bad"), "--data", data, "--variants", "hilt,cnn"])
    with pytest.raises(SystemExit):
        probe.main(["--out", str(out / "bad"), "--data", data, "--readout", "mean"])


def test_probe_readouts_pool_tokens_as_named():
    """max+mean reads a global shift that max alone misses when one token dominates."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="readout"):
        probe.VisionProbe("vit-micro", "lr-only", "cpu-micro", readout="sum")
    tokens = torch.zeros(2, 5, 3)
    tokens[:, 0] = 10.0  # the same dominant token in both samples
    tokens[1, 1:] = 1.0  # sample 1: every other token raised (a global change)
    from hilt_scale.model.findings import max_mean

    pooled = max_mean(tokens)
    assert pooled.shape == (2, 6)
    assert torch.equal(pooled[0, :3], pooled[1, :3])  # the max cannot tell them apart
    assert (pooled[1, 3:] > pooled[0, 3:]).all()  # the mean can


def test_class_max_head_reads_a_lift_that_no_single_feature_maximum_shows():
    """A token lifted along (1, -1) beside an edge token that is the maximum of every feature: the
    per-feature max and the mean are the same with and without it, so no max+mean head can tell
    the samples apart; class-max scores each token first and finds it."""
    from hilt_scale.model.findings import FindingHead

    with pytest.raises(ValueError, match="finding_readout"):
        FindingHead(2, 1, "sum")
    tokens = torch.zeros(2, 4, 2)
    tokens[:, 0] = 5.0  # the edge: every feature's maximum, in both samples
    tokens[1, 1] = torch.tensor([3.0, -3.0])  # the finding
    tokens[1, 2] = torch.tensor([-3.0, 3.0])  # keeps sample 1's mean equal to sample 0's
    plain, scored = FindingHead(2, 3, "max+mean"), FindingHead(2, 3, "class-max")
    scored.load_state_dict(plain.state_dict())  # the same parameters serve both readouts
    with torch.no_grad():
        same = plain(tokens)
        assert torch.allclose(same[0], same[1])
        scored.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0]] * 3))
        scored.bias.zero_()
        assert (scored(tokens)[1] - scored(tokens)[0] == 6.0).all()
    # Against a loop over classes and tokens on random input.
    torch.manual_seed(0)
    x, head = torch.randn(3, 7, 5), FindingHead(5, 4, "class-max")
    want = torch.empty(3, 4)
    for b in range(3):
        for k in range(4):
            scores = [float(head.weight[k, :5] @ x[b, n]) for n in range(7)]
            want[b, k] = max(scores) + float(head.weight[k, 5:] @ x[b].mean(0)) + float(head.bias[k])
    assert torch.allclose(head(x), want, atol=1e-5)
