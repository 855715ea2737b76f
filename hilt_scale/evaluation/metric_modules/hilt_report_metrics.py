"""hilt-scale's nine report metrics as a local Hugging Face ``evaluate`` module (no hub access).

    import evaluate
    from hilt_scale.evaluation.metric_modules import MODULE_PATH
    metric = evaluate.load(MODULE_PATH)
    metric.compute(predictions=["no pleural effusion"], references=["pleural effusion is observed"])

Returns ``hilt_scale.evaluation.metrics.compute_metrics`` (0-100, ``average``, ``unavailable``). evaluate
copies this file into its cache and checks each import line for an installed package, hence
one module per import line.
"""

import datasets
import evaluate

import hilt_scale.evaluation.metrics

_DESCRIPTION = "BLEU-1..4, METEOR, ROUGE-1/2/L, CIDEr-D and their average (0-100), as in hilt-scale."
_KWARGS = """
predictions: list of generated reports (str). references: list of reference reports (str), one each.
"""


class HiltReportMetrics(evaluate.Metric):
    """Corpus-level report-generation metrics of hilt-scale, offline."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the inputs: one prediction and one reference string per report."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        """Score the whole set at once (BLEU, METEOR and CIDEr-D are corpus-level)."""
        return hilt_scale.evaluation.metrics.compute_metrics(references, predictions)
