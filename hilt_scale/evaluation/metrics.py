"""The nine report-generation metrics of the HILT paper, computed offline the way R2Gen does.

Text is tokenised as pycocoevalcap's ``COCOEvalCap`` does: Stanford PTBTokenizer (the jar shipped
with pycocoevalcap, ``-preserveLines -lowerCase``) on lowercased text, then its punctuation tokens
dropped (``tokenize``). BLEU-1..4, METEOR (Java METEOR 1.5), ROUGE-L and CIDEr-D come from the
pycocoevalcap scorers on those tokens, called one by one (never ``COCOEvalCap.evaluate()`` or
SPICE: those download models); ROUGE-1/2 from rouge-score (F1) on the same tokens. Without Java
a pure-Python approximation of the tokenizer is used (``normalize``) and the result says so
(``tokenizer: "python"``, ``approximate: True``). Every value is on a 0-100 scale (CIDEr-D
multiplied by 100 like the rest). ``average`` is the paper's "averaged metric": the mean of the
nine, or of those available (``average_of``; ``unavailable`` says why one is missing).
"""

from __future__ import annotations

import atexit
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

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
    """Lowercase, PTB-style word tokens joined by single spaces, punctuation removed.

    A pure-Python approximation of ``ptb_tokenize`` (no Java): it differs on e.g. ``23x16.5mm``
    (PTB: ``23x16 .5 mm``), ``cannot`` (PTB: ``can not``), ``it's`` (PTB: ``it 's``) and brackets
    (PTB keeps ``-lrb-``/``-rrb-``). Used where Java is missing and to spot empty texts.
    """
    return " ".join(_TOKEN.findall(text.lower()))


TOKENIZERS = ("auto", "ptb", "python")
# Characters Java's line reader treats as line ends: each text must stay one line, or the
# tokenised lines shift against the texts (pycocoevalcap itself replaces only "\n").
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenise exactly as pycocoevalcap's ``PTBTokenizer().tokenize`` does, on lowercased text.

    Same jar, class, flags and punctuation list, one JVM for all texts; but the temporary input
    file goes to a fresh private temporary directory instead of the installed package directory,
    so read-only installs and concurrent runs work. Raises RuntimeError without Java.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java not found on PATH (the PTB tokenizer is a Java program)")
    if not texts:
        return []
    jar = Path(ptb.__file__).resolve().with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [_LINE_BREAKS.sub(" ", t.lower()) for t in texts]
    with tempfile.TemporaryDirectory(prefix="hilt-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_bytes("\n".join(lines).encode())
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        proc = subprocess.run([*cmd, src.name], cwd=tmp, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}"
        )
    out = proc.stdout.decode().split("\n")
    if len(out) not in (len(lines), len(lines) + 1) or (len(out) > len(lines) and out[-1]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} texts")
    punctuation = set(ptb.PUNCTUATIONS)
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in out[: len(lines)]
    ]


def tokenize(texts: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """Tokenised texts and the tokenizer used: ``ptb`` (the standard; ``auto`` with Java) or
    ``python`` (``normalize``; ``auto`` without Java: scores then only approximate the standard)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "python" or (tokenizer == "auto" and shutil.which("java") is None):
        return [normalize(t) for t in texts], "python"
    return ptb_tokenize(texts), "ptb"


class _Whitespace:
    """rouge-score tokenizer that keeps the tokens it is given (ROUGE-1/2 on the PTB tokens)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


# METEOR's JVM dies on a line of tens of thousands of words (a runaway generation), and with it
# METEOR for the whole set: each text is cut to this many tokens for METEOR only (reports are
# <= 512 tokens), and the number of texts cut is reported (``meteor_truncated``).
METEOR_MAX_TOKENS = 2000
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


def per_report_scores(references: Sequence[str], hypotheses: Sequence[str], tokenizer: str = "auto") -> dict:
    """Corpus scores, per-report scores (0-100) and BLEU statistics; see ``compute_metrics``.

    Returns ``{"corpus": {metric: value}, "per_report": {metric: [value per report]},
    "bleu_stats": [[testlen, reflen, guess1..4, correct1..4] per report], "unavailable": {...},
    "tokenizer": "ptb" | "python"}``;
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

    tokens, used = tokenize([*references, *hypotheses], tokenizer)
    n = len(references)
    gts = {i: [t] for i, t in enumerate(tokens[:n])}
    res = {i: [t] for i, t in enumerate(tokens[n:])}
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
    cut = sum(len(t.split()) > METEOR_MAX_TOKENS for t in tokens)
    if cut:
        gts_m = {i: [" ".join(v[0].split()[:METEOR_MAX_TOKENS])] for i, v in gts.items()}
        res_m = {i: [" ".join(v[0].split()[:METEOR_MAX_TOKENS])] for i, v in res.items()}
    else:
        gts_m, res_m = gts, res
    try:
        meteor, meteor_each = meteor_scorer().compute_score(gts_m, res_m)
        corpus["meteor"] = 100.0 * meteor
        per["meteor"] = [100.0 * s for s in meteor_each]
    except RuntimeError as exc:
        unavailable["meteor"] = str(exc)
    except (OSError, ValueError) as exc:  # the JVM died mid-run: drop it, a later call restarts it
        _close_meteor()
        unavailable["meteor"] = f"METEOR failed during scoring: {type(exc).__name__}: {exc}"
    # ROUGE-1/2 on the same tokens as the other metrics (rouge-score's default tokenizer would
    # split them again on non-alphanumerics and turn "-lrb-" into "lrb"); no stemming.
    scorer = RougeScorer(["rouge1", "rouge2"], tokenizer=_Whitespace())
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
    return {
        "corpus": corpus,
        "per_report": per,
        "bleu_stats": bleu_stats,
        "unavailable": unavailable,
        "tokenizer": used,
        "meteor_truncated": cut,
    }


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


def summarize(corpus: dict[str, float], unavailable: dict[str, str], tokenizer: str = "ptb") -> dict:
    """The nine metrics present, their ``average``, ``average_of``, ``unavailable``, the
    ``tokenizer`` used and whether the numbers only ``approximate`` the standard pipeline."""
    out: dict = {name: corpus[name] for name in METRIC_NAMES if name in corpus}
    covered = [name for name in METRIC_NAMES if name in out]
    out["average"] = sum(out[name] for name in covered) / len(covered)
    out["average_of"] = covered
    out["unavailable"] = dict(unavailable)
    out["tokenizer"] = tokenizer
    out["approximate"] = tokenizer != "ptb"
    return out


def compute_metrics(references: Sequence[str], hypotheses: Sequence[str], tokenizer: str = "auto") -> dict:
    """Nine report metrics and their average on 0-100; ``unavailable`` maps metric -> reason.

    BLEU, METEOR, ROUGE-L and CIDEr-D are corpus-level scores of the pycocoevalcap scorers;
    ROUGE-1/2 are the mean per-report F1 of rouge-score, all on the tokens of ``tokenize``
    (``tokenizer``: auto | ptb | python). CIDEr-D's IDF comes from the references given, so CIDEr
    (and the average) depends on the evaluation set, not only on each report.
    """
    scores = per_report_scores(references, hypotheses, tokenizer)
    summary = summarize(scores["corpus"], scores["unavailable"], scores["tokenizer"])
    if scores["meteor_truncated"]:
        summary["meteor_truncated"] = scores["meteor_truncated"]
    return {**summary, "n": len(references)}
