"""The nine report-generation metrics of the HILT paper, computed offline the way R2Gen does.

BLEU-1..4, METEOR (Java METEOR 1.5), ROUGE-L and CIDEr-D come from the pycocoevalcap scorers,
called one by one (never ``COCOEvalCap.evaluate()`` or SPICE: those download models). ROUGE-1 and
ROUGE-2 come from rouge-score (F1). Every scorer sees the same normalised text (see
``normalize``), and every value is on a 0-100 scale (CIDEr-D multiplied by 100 like the rest).
``average`` is the paper's "averaged metric": the mean of the nine, or of those available
(``average_of`` lists them; ``unavailable`` says why a metric is missing, e.g. no Java).
"""

from __future__ import annotations

import atexit
import math
import re
import shutil
import threading
from collections.abc import Sequence

METRIC_NAMES: tuple[str, ...] = (
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "meteor",
    "rouge1",
    "rouge2",
    "rougeL",
    "cider",
)

# A token is a run of letters/digits; hyphens, apostrophes and slashes inside a word and the dot
# inside a decimal number keep it whole ("effusion-thickening", "7th-8th", "3.3", "13x9.3"), as
# the PTB tokenizer does. Everything else (punctuation, brackets, symbols) is dropped, as
# pycocoevalcap drops PTB punctuation tokens.
_TOKEN = re.compile(r"[^\W_]+(?:(?:[-'/]|(?<=\d)\.(?=\d))[^\W_]+)*")


def normalize(text: str) -> str:
    """Lowercase, PTB-style word tokens joined by single spaces, punctuation removed."""
    return " ".join(_TOKEN.findall(text.lower()))


_meteor_lock = threading.Lock()
_meteor_scorer = None
_meteor_error: str | None = None


def meteor_scorer():
    """Return a cached pycocoevalcap Meteor scorer (one JVM per process), or raise RuntimeError."""
    global _meteor_scorer, _meteor_error
    with _meteor_lock:
        if _meteor_scorer is not None:
            return _meteor_scorer
        if shutil.which("java") is None:
            # Not cached: a later call with Java on PATH may succeed.
            raise RuntimeError("java not found on PATH (METEOR 1.5 is a Java program)")
        if _meteor_error is not None:
            raise RuntimeError(_meteor_error)
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            scorer = Meteor()
            # Check the JVM really answers before trusting it with a whole evaluation set.
            scorer.compute_score({0: ["a b"]}, {0: ["a b"]})
        except Exception as exc:  # JVM start failures surface as OSError, ValueError, ...
            _meteor_error = f"METEOR failed to start: {type(exc).__name__}: {exc}"
            raise RuntimeError(_meteor_error) from exc
        _meteor_scorer = scorer
        atexit.register(_close_meteor)
        return scorer


def _close_meteor() -> None:
    """Stop the METEOR JVM (at interpreter exit, or after it failed mid-run)."""
    global _meteor_scorer
    if _meteor_scorer is not None:
        _meteor_scorer.meteor_p.kill()
        _meteor_scorer.meteor_p.wait()
        # pycocoevalcap's __del__ takes its lock, which a compute_score that raised leaves held.
        if _meteor_scorer.lock.locked():
            _meteor_scorer.lock.release()
        _meteor_scorer = None


def per_report_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus scores, per-report scores (0-100) and BLEU statistics; see ``compute_metrics``.

    Returns ``{"corpus": {metric: value}, "per_report": {metric: [value per report]},
    "bleu_stats": [[testlen, reflen, guess1..4, correct1..4] per report], "unavailable": {...}}``;
    the per-report values and BLEU statistics let ``hilt_scale.score`` bootstrap over reports.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no reports to score")
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from rouge_score.rouge_scorer import RougeScorer

    gts = {i: [normalize(r)] for i, r in enumerate(references)}
    res = {i: [normalize(h)] for i, h in enumerate(hypotheses)}
    corpus: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    unavailable: dict[str, str] = {}

    # What pycocoevalcap's Bleu(4).compute_score does, keeping the scorer to read its statistics.
    bleu_scorer = BleuScorer(n=4)
    for i in gts:
        bleu_scorer += (res[i][0], gts[i])
    bleu, bleu_each = bleu_scorer.compute_score(option="closest", verbose=0)
    for n in range(4):
        corpus[f"bleu{n + 1}"] = 100.0 * bleu[n]
        per[f"bleu{n + 1}"] = [100.0 * s for s in bleu_each[n]]
    bleu_stats = [
        [
            c["testlen"],
            bleu_scorer._single_reflen(c["reflen"], "closest", c["testlen"]),
            *c["guess"],
            *c["correct"],
        ]
        for c in bleu_scorer.ctest
    ]
    try:
        meteor, meteor_each = meteor_scorer().compute_score(gts, res)
        corpus["meteor"] = 100.0 * meteor
        per["meteor"] = [100.0 * s for s in meteor_each]
    except RuntimeError as exc:
        unavailable["meteor"] = str(exc)
    except (OSError, ValueError) as exc:  # the JVM died mid-run: drop it, a later call restarts it
        _close_meteor()
        unavailable["meteor"] = f"METEOR failed during scoring: {type(exc).__name__}: {exc}"
    # rouge-score's default tokenizer (no stemming) splits the normalised text again on any
    # non-alphanumeric character, so "effusion-thickening" counts as two ROUGE-1 tokens.
    scorer = RougeScorer(["rouge1", "rouge2"])
    pairs = [scorer.score(gts[i][0], res[i][0]) for i in gts]
    for name in ("rouge1", "rouge2"):
        per[name] = [100.0 * p[name].fmeasure for p in pairs]
        corpus[name] = sum(per[name]) / len(per[name])
    rouge_l, rouge_l_each = Rouge().compute_score(gts, res)
    corpus["rougeL"] = 100.0 * float(rouge_l)
    per["rougeL"] = [100.0 * float(s) for s in rouge_l_each]
    cider, cider_each = Cider().compute_score(gts, res)
    corpus["cider"] = 100.0 * float(cider)
    per["cider"] = [100.0 * float(s) for s in cider_each]
    return {"corpus": corpus, "per_report": per, "bleu_stats": bleu_stats, "unavailable": unavailable}


def bleu_from_stats(stats: Sequence[Sequence[float]]) -> list[float]:
    """Corpus BLEU-1..4 (0-100) from summed per-report statistics, exactly as pycocoevalcap does."""
    tiny, small = 1e-15, 1e-9
    total = [sum(column) for column in zip(*stats)]
    testlen, reflen, guess, correct = total[0], total[1], total[2:6], total[6:10]
    out, bleu = [], 1.0
    for k in range(4):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
        out.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return [100.0 * b for b in out]


def summarize(corpus: dict[str, float], unavailable: dict[str, str]) -> dict:
    """The nine metrics present, their ``average``, ``average_of`` and ``unavailable``."""
    out: dict = {name: corpus[name] for name in METRIC_NAMES if name in corpus}
    covered = [name for name in METRIC_NAMES if name in out]
    out["average"] = sum(out[name] for name in covered) / len(covered)
    out["average_of"] = covered
    out["unavailable"] = dict(unavailable)
    return out


def compute_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Nine report metrics and their average on 0-100; ``unavailable`` maps metric -> reason.

    BLEU, METEOR, ROUGE-L and CIDEr-D are corpus-level scores of the pycocoevalcap scorers;
    ROUGE-1/2 are the mean per-report F1 of rouge-score. CIDEr-D's IDF comes from the references
    given, so CIDEr (and the average) depends on the evaluation set, not only on each report.
    """
    scores = per_report_scores(references, hypotheses)
    return {**summarize(scores["corpus"], scores["unavailable"]), "n": len(references)}
