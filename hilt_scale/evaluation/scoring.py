"""Score generated reports: nine text metrics + clinical efficacy, bootstrap CIs, benchmark tables.

The library behind ``python -m hilt_scale.score`` (see there for the command line).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hilt_scale.evaluation import metrics
from hilt_scale.evaluation.labeler import clinical_efficacy, label_reports, prf
from shards.io import read_jsonl
from shards.schema import CLASSES

FIELDS = ("key", "reference", "generated")


def check_records(records: Sequence[dict], source: str = "records") -> None:
    """Raise ValueError naming the record if a key is missing, not a string, empty or duplicated."""
    seen: dict[str, int] = {}
    for number, rec in enumerate(records, 1):
        where = f"{source}:{number}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for field in FIELDS:
            if field not in rec:
                raise ValueError(f"{where}: missing key '{field}'")
            if not isinstance(rec[field], str):
                raise ValueError(f"{where}: '{field}' must be a string, got {type(rec[field]).__name__}")
        if not rec["key"]:
            raise ValueError(f"{where}: empty 'key'")
        if not metrics.normalize(rec["reference"]):
            raise ValueError(f"{where}: empty 'reference' for key {rec['key']!r} (nothing to score against)")
        if rec["key"] in seen:
            raise ValueError(f"{where}: duplicate key {rec['key']!r} (first at {source}:{seen[rec['key']]})")
        seen[rec["key"]] = number
        labels = rec.get("labels")
        if labels is not None and not (
            isinstance(labels, dict) and all(labels.get(name) in (0, 1) for name in CLASSES)
        ):
            raise ValueError(f"{where}: 'labels' must map each of the 18 CT-RATE classes to 0 or 1")


def evaluate_records(
    records: Sequence[dict],
    bootstrap: int = 0,
    seed: int = 0,
    tokenizer: str = "auto",
    ce_model: str | Path | None = None,
) -> dict:
    """Nine metrics (0-100) + clinical efficacy (0-1) of ``generated`` against ``reference``.

    Keys: those of ``metrics.compute_metrics`` (``tokenizer``: auto | ptb | python); ``ce_{micro,macro}_{precision,recall,f1}`` and
    ``ce_per_class`` from labelling both texts with ``hilt_scale.labeler`` (``ce_ground_truth``
    names it: "labeler on references"); when every record has ``labels`` (the dataset's),
    ``ce_labels_*`` and ``ce_labels_per_class`` score the labeler on generated text against them;
    with ``ce_model`` (a local CT-CLIP RadBERT classifier, ``radbert.load_classifier``) also
    ``radbert_ref_*`` (against the classifier on the references), ``radbert_labels_*`` (against
    the dataset labels, when present), ``radbert_per_class`` and ``radbert`` (what was run);
    ``n``, ``n_empty_generated``; with ``bootstrap`` > 0, ``ci95`` -> {average, ce_micro_f1,
    ce_macro_f1: [low, high]} from that many resamples of the reports.
    """
    check_records(records)
    refs = [r["reference"] for r in records]
    gens = [r["generated"] for r in records]
    scores = metrics.per_report_scores(refs, gens, tokenizer)
    out = metrics.summarize(scores["corpus"], scores["unavailable"], scores["tokenizer"])
    if scores.get("meteor_truncated"):  # runaway texts cut for METEOR only (metrics.METEOR_MAX_TOKENS)
        out["meteor_truncated"] = scores["meteor_truncated"]
    truth, predicted = label_reports(refs), label_reports(gens)
    efficacy = clinical_efficacy(truth, predicted)
    out.update({k: v for k, v in efficacy.items() if k != "per_class"})
    out["ce_per_class"] = efficacy["per_class"]
    out["ce_ground_truth"] = LABELER_TRUTH
    labels = dataset_labels(records)
    if labels is not None:
        out.update(_prefixed(clinical_efficacy(labels, predicted), "ce_labels"))
    if ce_model is not None:
        out.update(radbert_scores(refs, gens, labels, ce_model))
    out.update(head_auc(records) or {})  # the finding head's reading, apart from the LLM's writing
    out["n"] = len(records)
    out["n_empty_generated"] = sum(1 for g in gens if not metrics.normalize(g))
    if bootstrap > 0:
        out["ci95"] = bootstrap_ci(scores, truth, predicted, bootstrap, seed)
        out["bootstrap"] = {"resamples": bootstrap, "seed": seed}
    return out


LABELER_TRUTH = "labeler on references"
CLASSIFIER_TRUTH = "classifier on references"
LABELS_TRUTH = "dataset labels"


def dataset_labels(records: Sequence[dict]) -> list[dict[str, int]] | None:
    """The records' ``labels`` (the data set's 18 class labels) when every record has them, else None."""
    if records and all(r.get("labels") is not None for r in records):
        return [r["labels"] for r in records]
    return None


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic over (positive, negative) pairs, ties counted 1/2;
    NaN when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each run of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def head_auc(records: Sequence[dict]) -> dict | None:
    """ROC AUC of the model's finding head (``finding_probs``, 18 per record) against the data
    set's labels, per class (NaN where a class has one value only) and their mean over the
    classes that have both; None unless every record has both."""
    labels = dataset_labels(records)
    if labels is None or not all(r.get("finding_probs") is not None for r in records):
        return None
    probs = np.asarray([r["finding_probs"] for r in records], dtype=np.float64)
    per = {c: roc_auc(np.array([lab[c] for lab in labels]), probs[:, i]) for i, c in enumerate(CLASSES)}
    finite = [v for v in per.values() if not math.isnan(v)]
    return {"head_auc_macro": float(np.mean(finite)) if finite else float("nan"), "head_auc_per_class": per}


def _prefixed(efficacy: dict, prefix: str) -> dict:
    """``ce_micro_f1`` -> ``{prefix}_micro_f1``, ..., ``per_class`` -> ``{prefix}_per_class``."""
    return {f"{prefix}_{k.removeprefix('ce_')}": v for k, v in efficacy.items()}


def radbert_scores(
    refs: Sequence[str], gens: Sequence[str], labels: list[dict[str, int]] | None, ce_model: str | Path
) -> dict:
    """CT-CLIP's RadBERT classifier on the generated reports, against the classifier's labels of
    the references (``radbert_ref_*``) and, when given, the dataset labels (``radbert_labels_*``)."""
    from hilt_scale.evaluation.radbert import MAX_LENGTH, THRESHOLD, load_classifier  # noqa: PLC0415

    classifier = load_classifier(ce_model)
    predicted = classifier.predict(gens)
    truths = {CLASSIFIER_TRUTH: ("radbert_ref", classifier.predict(refs))}
    if labels is not None:
        truths[LABELS_TRUTH] = ("radbert_labels", labels)
    out: dict = {
        "radbert": {
            "checkpoint": classifier.source,
            "threshold": THRESHOLD,
            "max_length": MAX_LENGTH,
            "ground_truths": {name: prefix for name, (prefix, _) in truths.items()},
        },
        "radbert_per_class": {},
    }
    for name, (prefix, truth) in truths.items():
        efficacy = _prefixed(clinical_efficacy(truth, predicted), prefix)
        out["radbert_per_class"][name] = efficacy.pop(f"{prefix}_per_class")
        out.update(efficacy)
    return out


def bootstrap_ci(scores: dict, truth: list[dict], predicted: list[dict], resamples: int, seed: int) -> dict:
    """95 % percentile intervals of the average and the F1s over resamples of the reports.

    Each resample recomputes corpus BLEU from summed statistics, ROUGE-1/2/L and CIDEr-D as means
    of per-report scores (CIDEr-D's IDF stays that of the full set) and METEOR as the mean of
    per-report METEOR (Java METEOR pools statistics inside the JVM; its mean is the one
    approximation here). Micro/macro F1 are recomputed from the resampled label rows.
    """
    n = len(truth)
    rng = np.random.default_rng(seed)
    per = {name: np.asarray(v) for name, v in scores["per_report"].items()}
    stats = np.asarray(scores["bleu_stats"], dtype=np.float64)
    t = np.array([[row[c] for c in CLASSES] for row in truth], dtype=bool)
    p = np.array([[row[c] for c in CLASSES] for row in predicted], dtype=bool)
    covered = [m for m in metrics.METRIC_NAMES if m in scores["corpus"]]
    averages, micro, macro = [], [], []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        values = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), metrics.bleu_from_stats([stats[idx].sum(0)])))
        for name in covered:
            if not name.startswith("bleu"):
                values[name] = float(per[name][idx].mean())
        averages.append(sum(values[m] for m in covered) / len(covered))
        tp = (t[idx] & p[idx]).sum(0)
        fp = (~t[idx] & p[idx]).sum(0)
        fn = (t[idx] & ~p[idx]).sum(0)
        micro.append(prf(tp.sum(), fp.sum(), fn.sum())["f1"])
        macro.append(float(np.mean([prf(a, b, c)["f1"] for a, b, c in zip(tp, fp, fn)])))
    return {
        name: _interval(v)
        for name, v in (("average", averages), ("ce_micro_f1", micro), ("ce_macro_f1", macro))
    }


def _interval(values: list[float]) -> list[float]:
    """The 2.5th and 97.5th percentiles."""
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# ---------------------------------------------------------------- files


def read_predictions(path: Path) -> list[dict]:
    """Read a predictions JSONL; a bad line raises ValueError naming the file and line."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no records")
    check_records(records, str(path))
    return records


def format_report(scores: dict) -> str:
    """A short human table of the scores (Markdown)."""
    names = [*metrics.METRIC_NAMES, "average", "ce_micro_f1", "ce_macro_f1"]
    ci = scores.get("ci95", {})
    rows = ["| metric | value | 95 % CI |", "|---|---|---|"]
    for name in names:
        if name not in scores:
            rows.append(f"| {name} | n/a | {scores['unavailable'].get(name, '')} |")
            continue
        interval = f"{ci[name][0]:.3f} - {ci[name][1]:.3f}" if name in ci else ""
        rows.append(f"| {name} | {scores[name]:.3f} | {interval} |")
    rows.append(f"\naverage of {len(scores['average_of'])}: {', '.join(scores['average_of'])}; ")
    rows[-1] += f"{scores['n']} reports, {scores['n_empty_generated']} empty generated"
    if scores.get("approximate"):
        rows.append(
            f"tokenizer: {scores.get('tokenizer')} (pure-Python, used without Java): the text metrics only "
            "APPROXIMATE the standard pycocoevalcap PTB tokenisation; use Java for comparable numbers"
        )
    else:
        rows.append(
            f"tokenizer: {scores.get('tokenizer', 'ptb')} (pycocoevalcap PTBTokenizer, lowercased text)"
        )
    if len(clinical_rows(scores)) > 1:
        rows += ["", format_clinical(scores)]
    return "\n".join(rows)


def clinical_rows(scores: dict) -> list[tuple[str, str, str, dict]]:
    """(labels of generated text by, ground truth, key prefix, per-class dict) of each CE result."""
    out = [("labeler", scores.get("ce_ground_truth", LABELER_TRUTH), "ce", scores.get("ce_per_class", {}))]
    if "ce_labels_micro_f1" in scores:
        out.append(("labeler", LABELS_TRUTH, "ce_labels", scores["ce_labels_per_class"]))
    for truth, prefix in scores.get("radbert", {}).get("ground_truths", {}).items():
        out.append(("CT-CLIP RadBERT", truth, prefix, scores["radbert_per_class"][truth]))
    return out


def format_clinical(scores: dict) -> str:
    """Markdown: micro/macro P/R/F1 of each (labels of generated text, ground truth), then per class."""
    rows = clinical_rows(scores)
    lines = [
        "| generated labelled by | ground truth | micro P | micro R | micro F1 | macro P | macro R | macro F1 "
        "| weighted P | weighted R | weighted F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, truth, prefix, _ in rows:
        cells = [
            f"{scores[f'{prefix}_{a}_{m}']:.3f}"
            for a in ("micro", "macro", "weighted")
            for m in ("precision", "recall", "f1")
        ]
        lines.append(f"| {system} | {truth} | " + " | ".join(cells) + " |")
    lines += ["", "per class, P / R / F1 (support):", ""]
    lines.append("| class | " + " | ".join(f"{s}, vs {t}" for s, t, _, _ in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for name in CLASSES:
        cells = [
            f"{c['precision']:.2f} / {c['recall']:.2f} / {c['f1']:.2f} ({c['support']})"
            for c in (per[name] for _, _, _, per in rows)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- benchmark table


# train_config.json fields that may differ between runs of one grid point besides the seed.
_NOT_SETTINGS = ("seed", "out", "local_rank", "resume", "cache")


def run_row(run_dir: Path) -> dict:
    """The paper-table fields of one run, from its ``summary.json`` (keys: docs/EVALUATION.md).

    Also ``seed`` and ``settings`` (the run's ``train_config.json`` without the seed, output
    directory and launcher fields; None without that file), which ``compare_table`` groups by.
    """
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read run summary ({exc})") from exc
    config: dict = {}
    config_path = run_dir / "export" / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    train: dict | None = None
    train_path = run_dir / "train_config.json"
    if train_path.exists():
        try:
            train = json.loads(train_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{train_path}: cannot read run config ({exc})") from exc
    sets = summary.get("eval")
    if sets is None and "final" in summary:  # the trainer's single-set summary
        sets = {summary.get("eval_split", "eval"): summary["final"]}
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"{path}: no 'eval' (set name -> metrics) or 'final' key")
    hr = summary.get("hr_size") or config.get("resolution", {}).get("hr_size")
    return {
        "run": run_dir.name,
        "method": summary.get("method")
        or summary.get("connector")
        or config.get("connector", {}).get("kind"),
        "hr_size": "x".join(str(v) for v in hr) if hr else None,
        "visual_tokens": summary.get("visual_tokens"),
        "llm": summary.get("llm") or config.get("llm", {}).get("name"),
        "eval": sets,
        "seed": None if train is None else train.get("seed"),
        "settings": None
        if train is None
        else json.dumps({k: v for k, v in train.items() if k not in _NOT_SETTINGS}, sort_keys=True),
    }


def group_seeds(rows: Sequence[dict]) -> list[list[dict]]:
    """Runs that differ only by seed (same table fields and same settings), in first-seen order.

    A run without ``train_config.json`` is a group of its own.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        same = row["settings"] is not None and row["seed"] is not None
        key = (
            row["method"],
            row["hr_size"],
            row["visual_tokens"],
            row["llm"],
            row["settings"] if same else row["run"],
        )
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def compare_table(run_dirs: Sequence[Path]) -> str:
    """Markdown table: method, input resolution, visual tokens, LLM, seeds, then average and CE F1
    per evaluation set. Runs that differ only by seed share one row: mean ± sample std over them
    (``(n=k)`` where fewer seeds than the row's have that set)."""
    rows = [run_row(Path(d)) for d in run_dirs]
    sets = list(dict.fromkeys(name for row in rows for name in row["eval"]))
    head = ["Method", "Input resolution", "Visual tokens", "LLM", "Seeds"]
    for name in sets:
        head += [f"Average ({name})", f"F1 ({name})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in group_seeds(rows):
        first = group[0]
        seeds = sorted(r["seed"] for r in group if r["seed"] is not None)
        shown = f"{len(group)} ({', '.join(map(str, seeds))})" if seeds else str(len(group))
        cells = [
            first["method"] or first["run"],
            first["hr_size"],
            first["visual_tokens"],
            first["llm"],
            shown,
        ]
        for name in sets:
            got = [r["eval"].get(name) or {} for r in group]  # an unevaluated run has None
            cells += [
                _stat([g.get("average") for g in got], 2),
                _stat([g.get("ce_micro_f1") for g in got], 3),
            ]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stat(values: list[object], digits: int) -> str | None:
    """One run: the value; several: mean ± sample std over the finite ones, "(n=k)" if some lack it."""
    vals = [float(v) for v in values if _number(v)]
    if not vals:
        return None
    if len(values) == 1:
        return f"{vals[0]:.{digits}f}"
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" (n={len(vals)})" if len(vals) < len(values) else "")
