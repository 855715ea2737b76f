"""Report evaluation: metrics + clinical efficacy, bootstrap intervals, bad input, the benchmark table."""

import json
from pathlib import Path

import pytest

from hilt_scale import score
from hilt_scale.evaluation import labeler, metrics, scoring

REFS = [
    "Bilateral pleural effusion is observed. Cardiomegaly.",
    "No pleural effusion. A 4 mm nodule in the right lung upper lobe.",
    "Emphysematous changes in both lungs. No consolidation.",
    "Consolidation in the left lower lobe with air bronchograms.",
    "Heart contour and size are normal. No pericardial effusion.",
    "Calcific atheroma plaques in the aorta and coronary arteries.",
]
GENS = [
    "Bilateral pleural effusion is observed. The heart size is normal.",
    "No pleural effusion. No nodule.",
    "Emphysematous changes in both lungs.",
    "Consolidation in the left lower lobe.",
    "",
    "Calcific atheroma plaques in the coronary arteries.",
]


def _records(refs=REFS, gens=GENS) -> list[dict]:
    return [{"key": f"k{i}", "reference": r, "generated": g} for i, (r, g) in enumerate(zip(refs, gens))]


@pytest.fixture(scope="module")
def scored() -> dict:
    return scoring.evaluate_records(_records(), bootstrap=200, seed=1)


def test_scores_combine_text_metrics_and_clinical_efficacy(scored) -> None:
    text = metrics.compute_metrics(REFS, GENS)
    for name in (*metrics.METRIC_NAMES, "average"):
        if name in text:
            assert scored[name] == pytest.approx(text[name], abs=1e-9)
    ce = labeler.clinical_efficacy(labeler.label_reports(REFS), labeler.label_reports(GENS))
    assert scored["ce_micro_f1"] == pytest.approx(ce["ce_micro_f1"])
    assert scored["ce_per_class"]["Cardiomegaly"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }
    # Pleural effusion (1/1), emphysema, consolidation, coronary found; cardiomegaly, nodule, arterial missed.
    assert scored["ce_per_class"]["Pleural effusion"]["f1"] == 1.0
    assert scored["ce_micro_precision"] == 1.0 and scored["ce_micro_recall"] == pytest.approx(4 / 7)
    assert scored["n"] == 6 and scored["n_empty_generated"] == 1


def test_bootstrap_intervals_bracket_the_estimates_and_repeat(scored) -> None:
    for name in ("ce_micro_f1", "ce_macro_f1"):
        low, high = scored["ci95"][name]
        assert low <= scored[name] <= high
        assert low < high
    low, high = scored["ci95"]["average"]
    assert 0 <= low < high  # CIDEr-D x 100 can pass 100, so the average has no upper bound of 100
    again = scoring.evaluate_records(_records(), bootstrap=200, seed=1)
    assert again["ci95"] == scored["ci95"]


def test_bleu_statistics_reproduce_corpus_bleu() -> None:
    # The bootstrap recomputes BLEU from per-report statistics: on the full set it must equal the scorer.
    s = metrics.per_report_scores(REFS, GENS)
    for n, value in enumerate(metrics.bleu_from_stats(s["bleu_stats"])):
        assert value == pytest.approx(s["corpus"][f"bleu{n + 1}"], abs=1e-9)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b'{"key": "a", "reference": "x"}'], r"pred.jsonl:1: missing key 'generated'"),
        (
            [
                b'{"key": "a", "reference": "x", "generated": "y"}',
                b'{"key": "a", "reference": "z", "generated": "y"}',
            ],
            r"pred.jsonl:2: duplicate key 'a' \(first at .*pred.jsonl:1\)",
        ),
        ([b'{"key": "a", "reference": "x", "generated": "\xff\xfe"}'], r"pred.jsonl:1: not UTF-8"),
        (
            [b'{"key": "a", "reference": "x", "generated": null}'],
            r"pred.jsonl:1: 'generated' must be a string",
        ),
        ([b'{"key": "a", "reference": " . ", "generated": "y"}'], r"pred.jsonl:1: empty 'reference'"),
        ([b"{not json"], r"pred.jsonl:1: not a JSON line"),
        ([b""], r"pred.jsonl: no records"),
    ],
)
def test_bad_prediction_files_fail_naming_file_and_line(
    tmp_path: Path, lines: list[bytes], message: str
) -> None:
    path = tmp_path / "pred.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=message):
        scoring.read_predictions(path)


def test_cli_prints_table_and_json_line_and_writes_out(tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    out = tmp_path / "m" / "metrics.json"
    score.main([str(pred), "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("| metric |")
    last = json.loads(printed[-1])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert last["average"] == pytest.approx(saved["average"])
    assert "ce_per_class" in saved and "ce_per_class" not in last
    with pytest.raises(SystemExit, match="error: .*no records"):
        (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
        score.main([str(tmp_path / "empty.jsonl")])


def test_compare_builds_the_paper_table(tmp_path: Path) -> None:
    explicit = tmp_path / "hilt_512"
    explicit.mkdir()
    summary = {
        "method": "HILT",
        "hr_size": [256, 512, 512],
        "visual_tokens": 64,
        "llm": "llama3-8b",
        "eval": {"ct-rate valid": {"average": 31.234, "ce_micro_f1": 0.4567}, "phantom": {"average": 50.0}},
    }
    (explicit / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    # A run as the trainer writes it today: a single 'final' set, method/size/LLM from export/config.json.
    trainer = tmp_path / "pool_run"
    (trainer / "export").mkdir(parents=True)
    (trainer / "summary.json").write_text(
        json.dumps({"final": {"average": 12.5, "ce_micro_f1": 0.1}, "eval_split": "valid"}), encoding="utf-8"
    )
    config = {
        "connector": {"kind": "pool"},
        "resolution": {"hr_size": [32, 128, 128]},
        "llm": {"name": "llm-tiny"},
    }
    (trainer / "export" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    unevaluated = tmp_path / "crashed"
    unevaluated.mkdir()
    (unevaluated / "summary.json").write_text(
        json.dumps({"final": None, "eval_split": "valid"}), encoding="utf-8"
    )
    assert (
        scoring.compare_table([unevaluated]).splitlines()[2]
        == "| crashed | n/a | n/a | n/a | 1 | n/a | n/a |"
    )
    table = scoring.compare_table([explicit, trainer]).splitlines()
    assert table[0] == (
        "| Method | Input resolution | Visual tokens | LLM | Seeds | Average (ct-rate valid) | F1 (ct-rate valid) "
        "| Average (phantom) | F1 (phantom) | Average (valid) | F1 (valid) |"
    )
    assert table[2] == "| HILT | 256x512x512 | 64 | llama3-8b | 1 | 31.23 | 0.457 | 50.00 | n/a | n/a | n/a |"
    assert table[3] == "| pool | 32x128x128 | n/a | llm-tiny | 1 | n/a | n/a | n/a | n/a | 12.50 | 0.100 |"
    with pytest.raises(ValueError, match=r"missing.*summary.json: cannot read"):
        scoring.compare_table([tmp_path / "missing"])


def _seed_run(root: Path, name: str, seed: int, average: float | None, f1: float, lr: float = 1e-4) -> Path:
    run = root / name
    run.mkdir()
    final = None if average is None else {"average": average, "ce_micro_f1": f1}
    summary = {"method": "hilt", "hr_size": [32, 64, 64], "visual_tokens": 64, "llm": "llm-tiny"}
    (run / "summary.json").write_text(
        json.dumps({**summary, "final": final, "eval_split": "test"}), encoding="utf-8"
    )
    config = {"seed": seed, "out": str(run), "lr": lr, "connector": "hilt", "local_rank": -1}
    (run / "train_config.json").write_text(json.dumps(config), encoding="utf-8")
    return run


def test_compare_groups_runs_that_differ_only_by_seed(tmp_path: Path, capsys) -> None:
    runs = [
        _seed_run(tmp_path, "s0", 0, 30.0, 0.4),
        _seed_run(tmp_path, "other-lr", 0, 99.0, 0.9, lr=3e-4),  # another setting: its own row
        _seed_run(tmp_path, "s1", 1, 32.0, 0.5),
        _seed_run(tmp_path, "s2", 2, 34.0, 0.6),
        _seed_run(tmp_path, "s3-crashed", 3, None, 0.0),
    ]
    score.main(["--compare", *map(str, runs)])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4
    # Mean ± sample std over the seeds that were evaluated: 32 ± 2, F1 0.5 ± 0.1 (3 of 4 seeds).
    assert (
        table[2]
        == "| hilt | 32x64x64 | 64 | llm-tiny | 4 (0, 1, 2, 3) | 32.00 ± 2.00 (n=3) | 0.500 ± 0.100 (n=3) |"
    )
    assert table[3] == "| hilt | 32x64x64 | 64 | llm-tiny | 1 (0) | 99.00 | 0.900 |"


def test_head_auc_scores_the_finding_probabilities_against_the_dataset_labels() -> None:
    """head_auc: per class the Mann-Whitney AUC of ``finding_probs`` against ``labels`` (NaN for a
    class with one value), the mean over the others; absent unless every record has both."""
    from shards.schema import CLASSES

    nodule, effusion = CLASSES.index("Lung nodule"), CLASSES.index("Pleural effusion")
    records = []
    for i, (has_nodule, has_effusion) in enumerate([(1, 0), (1, 1), (0, 0), (0, 1)]):
        probs = [0.5] * len(CLASSES)
        probs[nodule] = [0.9, 0.8, 0.3, 0.1][i]  # ranks the nodules first: AUC 1
        probs[effusion] = [0.9, 0.4, 0.3, 0.1][i]  # positives above 1 of the 4 (pos, neg) pairs: 0.25
        labels = {c: 0 for c in CLASSES} | {"Lung nodule": has_nodule, "Pleural effusion": has_effusion}
        records.append({"key": str(i), "reference": "x", "generated": "x", "labels": labels, "finding_probs": probs})
    out = scoring.head_auc(records)
    per = out["head_auc_per_class"]
    assert per["Lung nodule"] == 1.0 and per["Pleural effusion"] == 0.25
    assert sum(v == v for v in per.values()) == 2  # the 16 single-valued classes are NaN
    assert out["head_auc_macro"] == pytest.approx(0.625)
    assert scoring.head_auc([{**records[0], "finding_probs": None}, *records[1:]]) is None
    assert scoring.head_auc([{k: v for k, v in r.items() if k != "labels"} for r in records]) is None
    assert scoring.evaluate_records(records)["head_auc_macro"] == pytest.approx(0.625)
