"""Evaluation: the nine report metrics, the rule-based CT-RATE labeler, clinical efficacy, scoring.

Libraries only; the commands are ``python -m hilt_scale.score`` and ``python -m hilt_scale.labeler``.
"""
