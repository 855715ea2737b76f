"""Fused kernels for hilt-scale. ``hilt_attention`` is the public entry point."""

from kernels.reference import hilt_attention_reference

__all__ = ["hilt_attention_reference"]
