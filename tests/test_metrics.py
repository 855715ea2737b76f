"""The nine report metrics equal the reference scorers on the same normalised text."""

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


def test_each_metric_matches_scorer_called_directly(pairs) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from rouge_score.rouge_scorer import RougeScorer

    refs, hyps = pairs
    got = metrics.compute_metrics(refs, hyps)
    gts = {i: [metrics.normalize(r)] for i, r in enumerate(refs)}
    res = {i: [metrics.normalize(h)] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert got[f"bleu{n + 1}"] == pytest.approx(100 * bleu[n], abs=1e-9)
    assert got["rougeL"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert got["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], abs=1e-9)
    if shutil.which("java"):
        # The cached object is a plain pycocoevalcap Meteor (one JVM per test session).
        meteor = metrics.meteor_scorer().compute_score(gts, res)[0]
        assert got["meteor"] == pytest.approx(100 * meteor, abs=1e-9)
    # rouge-score with its own default tokenizer on the normalised text (no stemming).
    scorer = RougeScorer(["rouge1", "rouge2"])
    for name in ("rouge1", "rouge2"):
        direct = [scorer.score(gts[i][0], res[i][0])[name].fmeasure for i in gts]
        assert got[name] == pytest.approx(100 * sum(direct) / len(direct), abs=1e-9)
    assert got["average"] == pytest.approx(sum(got[m] for m in got["average_of"]) / len(got["average_of"]))


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
    monkeypatch.setattr(metrics, "_meteor_scorer", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    got = metrics.compute_metrics(["the heart is normal"], ["heart size normal"])
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
