"""Fused kernels for hilt-scale. ``hilt_attention`` is the public entry point."""

from kernels.hilt_attention import hilt_attention
from kernels.launch import triton_available
from kernels.reference import hilt_attention_reference

__all__ = ["hilt_attention", "hilt_attention_reference", "triton_available"]
