"""A runaway generation (50k words) must not cost the whole set its METEOR (issue 23, minor case)."""

import shutil

import pytest

from hilt_scale.evaluation.metrics import METEOR_MAX_TOKENS, compute_metrics


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_a_50k_word_report_keeps_meteor_for_the_set():
    refs = ["no pleural effusion was detected", "the heart is normal in size", "mild emphysema in both lungs"]
    hyps = ["no pleural effusion", "the heart is normal " + "word " * 50_000, "mild emphysema"]
    scores = compute_metrics(refs, hyps, tokenizer="python")
    assert "meteor" in scores and "meteor" not in scores["unavailable"], scores["unavailable"]
    assert scores["meteor_truncated"] == 1 and METEOR_MAX_TOKENS < 50_000
