"""Score generated reports: nine text metrics + clinical efficacy, bootstrap CIs, benchmark tables.

    python -m hilt_scale.score PRED.jsonl [--out metrics.json] [--bootstrap 1000] [--ce-model DIR]
    python -m hilt_scale.score --compare RUNDIR [RUNDIR ...]

PRED.jsonl has one JSON object per line with ``key``, ``reference`` and ``generated`` (the
trainer's ``predictions.jsonl``). Bad input is an error naming the file and line (non-UTF-8 or
non-JSON line, missing key, non-string text, empty reference, duplicate key); an empty
``generated`` text is scored as it is (it earns 0) and counted in ``n_empty_generated``.
An optional ``labels`` object (the data set's 18 class labels, 0/1) adds clinical efficacy
against them; ``--ce-model DIR`` adds CT-CLIP's RadBERT classifier (docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hilt_scale.evaluation.scoring import compare_table, evaluate_records, format_report, read_predictions
from shards.io import write_json_atomic


def main(argv: list[str] | None = None) -> None:
    """Command line: score a predictions file, or compare run directories."""
    parser = argparse.ArgumentParser(prog="python -m hilt_scale.score", description=__doc__.split("\n")[0])
    parser.add_argument("predictions", nargs="?", type=Path, help="JSONL with key, reference, generated")
    parser.add_argument("--out", type=Path, help="write the scores as JSON here (atomically)")
    parser.add_argument("--bootstrap", type=int, default=0, help="resamples for 95 %% CIs (e.g. 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--tokenizer", default="auto", choices=("auto", "ptb", "python"),
        help="auto = pycocoevalcap's PTB tokenizer when Java is present, else the pure-Python approximation",
    )  # fmt: skip
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RUNDIR", help="print the benchmark table")
    parser.add_argument(
        "--ce-model", type=Path, metavar="DIR",
        help="also label with CT-CLIP's RadBERT classifier from this local directory "
        "(RadBertClassifier.pth + the base model's config and tokenizer; docs/EVALUATION.md)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (args.predictions is None) == (args.compare is None):
        parser.error("give either PRED.jsonl or --compare RUNDIR...")
    try:
        if args.compare:
            print(compare_table(args.compare))
            return
        scores = evaluate_records(
            read_predictions(args.predictions), args.bootstrap, args.seed, args.tokenizer, args.ce_model
        )
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(format_report(scores))
    if args.out is not None:
        write_json_atomic(args.out, scores)
    print(json.dumps({k: v for k, v in scores.items() if not k.endswith("per_class")}))


if __name__ == "__main__":
    main()
