"""hilt-scale: HILT radiology report generation from high-resolution 3D CT, trained with DeepSpeed.

Subpackages: ``model`` (ViT, connectors, LLM), ``training`` (loop, DeepSpeed, checkpoints, logs),
``evaluation`` (metrics, labeler, scoring). Commands: train, score, info, labeler, generate.
"""
