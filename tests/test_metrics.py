"""The nine report metrics equal pycocoevalcap's own pipeline: its PTBTokenizer, then the scorers."""

import csv
import shutil
from pathlib import Path

import pytest

from hilt_scale.evaluation import metrics

DATA = Path(__file__).parents[2] / "shared" / "data" / "ctrate_text_labels" / "reports_labeled_800.csv"


def _real_reports(n: int) -> list[str]:
    if not DATA.exists():
        pytest.skip(f"shared CT-RATE report file absent: {DATA}")
    with DATA.open(encoding="utf-8", newline="") as f:
        return [row["report_text"] for _, row in zip(range(n), csv.DictReader(f))]


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str]]:
    """References = 12 real reports; hypotheses = other real reports (a plausible wrong model)."""
    texts = _real_reports(24)
    return texts[:12], texts[12:]


def test_normalize_lowercases_and_drops_punctuation() -> None:
    text = 'Pericardial effusion-thickening was NOT observed. A 13x9.3 mm node (right); "7th-8th".'
    assert metrics.normalize(text) == (
        "pericardial effusion-thickening was not observed a 13x9.3 mm node right 7th-8th"
    )
    assert metrics.normalize("...  ,;") == ""


def _ptb(texts: list[str]) -> dict[int, list[str]]:
    """The reference pipeline's tokens: pycocoevalcap's own PTBTokenizer on lowercased text."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({i: [{"caption": t.lower()}] for i, t in enumerate(texts)})


class _Whitespace:
    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


def _direct(gts: dict, res: dict, meteor: bool) -> dict[str, float]:
    """BLEU, METEOR, ROUGE-1/2/L, CIDEr-D from the scorers called directly on given tokens."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from rouge_score.rouge_scorer import RougeScorer

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": 100 * bleu[n] for n in range(4)}
    out["rougeL"] = 100 * Rouge().compute_score(gts, res)[0]
    out["cider"] = 100 * Cider().compute_score(gts, res)[0]
    if meteor:  # the cached object is a plain pycocoevalcap Meteor (one JVM per test session)
        out["meteor"] = 100 * metrics.meteor_scorer().compute_score(gts, res)[0]
    scorer = RougeScorer(["rouge1", "rouge2"], tokenizer=_Whitespace())
    for name in ("rouge1", "rouge2"):
        direct = [scorer.score(gts[i][0], res[i][0])[name].fmeasure for i in gts]
        out[name] = 100 * sum(direct) / len(direct)
    return out


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")


@needs_java
def test_each_metric_matches_cocoevalcap_pipeline(pairs) -> None:
    """PTBTokenizer().tokenize on lowercased text, then each scorer: what COCOEvalCap runs."""
    refs, hyps = pairs
    got = metrics.compute_metrics(refs, hyps)
    assert got["tokenizer"] == "ptb" and got["approximate"] is False
    tokens = _ptb(refs + hyps)
    gts = {i: tokens[i] for i in range(len(refs))}
    res = {i: tokens[len(refs) + i] for i in range(len(hyps))}
    want = _direct(gts, res, meteor=True)
    assert set(got["average_of"]) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    assert got["average"] == pytest.approx(sum(got[m] for m in got["average_of"]) / len(got["average_of"]))


@needs_java
def test_800_real_reports_tokenise_and_score_as_cocoevalcap(monkeypatch) -> None:
    """The 800 shared reports get exactly the real PTBTokenizer's tokens, so every scorer sees
    what COCOEvalCap would give it; the scores are then checked against a seeded shuffle both
    ways round on 80 of them (pure-Python ROUGE-L on all 800 takes ~30 s per pass; METEOR is
    checked on the set above: Java METEOR on long reports takes minutes)."""
    import random

    texts = _real_reports(800)
    assert len(texts) == 800
    real = _ptb(texts)
    assert metrics.ptb_tokenize(texts) == [real[i][0] for i in range(800)]

    def no_meteor():
        raise RuntimeError("skipped in this test")

    monkeypatch.setattr(metrics, "meteor_scorer", no_meteor)
    n = 80
    order = list(range(n))
    random.Random(0).shuffle(order)
    for ref_order, hyp_order in ((range(n), order), (order, range(n))):
        got = metrics.compute_metrics([texts[i] for i in ref_order], [texts[i] for i in hyp_order])
        gts = {k: real[i] for k, i in enumerate(ref_order)}
        res = {k: real[i] for k, i in enumerate(hyp_order)}
        for name, value in _direct(gts, res, meteor=False).items():
            assert got[name] == pytest.approx(value, abs=1e-9), name


@needs_java
def test_ptb_tokenizer_quirks_and_line_breaks() -> None:
    got = metrics.ptb_tokenize(["A 23x16.5mm node (right); cannot.", "b\rc", "", "Last one."])
    # PTB splits the decimal and the unit, "cannot", and keeps the lowercased bracket tokens.
    assert got[0] == "a 23x16 .5 mm node -lrb- right -rrb- can not"
    # A carriage return inside a text must not shift the following texts' tokens.
    assert got[1:] == ["b c", "", "last one"]


@needs_java
def test_ptb_tokenizer_writes_nothing_into_the_package_and_runs_concurrently() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pycocoevalcap.tokenizer import ptbtokenizer

    package = Path(ptbtokenizer.__file__).parent
    before = sorted(p.name for p in package.iterdir())
    texts = [[f"Report {i}: no effusion (none)."] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(metrics.ptb_tokenize, texts))
    assert outs == [[f"report {i} no effusion -lrb- none -rrb-"] for i in range(4)]
    assert sorted(p.name for p in package.iterdir()) == before


def test_identical_reports_score_full_marks(pairs) -> None:
    refs, _ = pairs
    got = metrics.compute_metrics(refs, refs)
    for name in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(100.0, abs=1e-6)
    assert got["cider"] > 500  # CIDEr-D of a perfect match is 10 (x100) when n-grams are informative


def test_rouge1_small_example_by_hand() -> None:
    # ref 4 tokens, hyp 3 tokens, 2 shared unigrams: P = 2/3, R = 2/4, F1 = 4/7.
    got = metrics.compute_metrics(["the heart is normal"], ["heart size normal"])
    assert got["rouge1"] == pytest.approx(100 * 4 / 7)
    assert got["bleu1"] > 0 and got["rouge2"] == 0.0


def test_empty_hypothesis_scores_zero_not_error() -> None:
    got = metrics.compute_metrics(["no pleural effusion", "heart is normal"], ["no pleural effusion", ""])
    assert got["rougeL"] == pytest.approx(50.0)
    assert got["n"] == 2


def test_missing_java_makes_meteor_unavailable(monkeypatch, tmp_path) -> None:
    from hilt_scale.evaluation.scoring import evaluate_records, format_report

    monkeypatch.setattr(metrics, "_meteor_scorer", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    got = metrics.compute_metrics(["the heart is normal"], ["heart size normal"])
    # The pure-Python tokenizer stands in, and the result says the numbers are approximate.
    assert got["tokenizer"] == "python" and got["approximate"] is True
    record = {"key": "a", "reference": "the heart is normal", "generated": "heart size normal"}
    assert "APPROXIMATE" in format_report(evaluate_records([record]))
    with pytest.raises(RuntimeError, match="java not found"):
        metrics.compute_metrics(["a"], ["a"], tokenizer="ptb")
    assert "meteor" not in got
    assert "java" in got["unavailable"]["meteor"]
    assert got["average_of"] == [m for m in metrics.METRIC_NAMES if m != "meteor"]
    assert got["average"] == pytest.approx(sum(got[m] for m in got["average_of"]) / 8)


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        metrics.compute_metrics(["a", "b"], ["a"])


def test_local_evaluate_module_loads_offline_and_agrees(monkeypatch) -> None:
    evaluate = pytest.importorskip("evaluate")
    from hilt_scale.evaluation.metric_modules import MODULE_PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    refs, hyps = (
        ["pleural effusion is observed", "the heart is normal"],
        ["no pleural effusion", "heart normal"],
    )
    got = evaluate.load(MODULE_PATH).compute(predictions=hyps, references=refs)
    want = metrics.compute_metrics(refs, hyps)
    for name in (*want["average_of"], "average"):
        assert got[name] == pytest.approx(want[name], abs=1e-9)


def test_meteor_dying_mid_run_is_reported_not_raised(monkeypatch) -> None:
    import threading

    class DeadJVM:
        """A Meteor whose Java process died: writing to it fails, as BrokenPipeError does."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.killed = False
            self.meteor_p = self

        def compute_score(self, gts, res):
            self.lock.acquire()  # pycocoevalcap holds its lock while talking to the JVM
            raise BrokenPipeError(32, "Broken pipe")

        def kill(self) -> None:
            self.killed = True

        def wait(self) -> None:
            pass

    dead = DeadJVM()
    monkeypatch.setattr(metrics, "_meteor_scorer", dead)
    got = metrics.compute_metrics(["the heart is normal"], ["heart size normal"])
    assert "METEOR failed during scoring: BrokenPipeError" in got["unavailable"]["meteor"]
    assert "meteor" not in got["average_of"] and len(got["average_of"]) == 8
    assert dead.killed and not dead.lock.locked()
    assert metrics._meteor_scorer is None  # the next call starts a fresh JVM
