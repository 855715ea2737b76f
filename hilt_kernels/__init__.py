"""Fused kernels for hilt-scale. ``hilt_attention`` is the public entry point.

Importing this package does not import triton: the model imports the eager reference on machines
without it. The Triton modules are imported on the first ``hilt_attention`` call.
"""

import importlib
import importlib.util
import os

from hilt_kernels.reference import hilt_attention_reference

IMPLS = ("v2", "v1")  # v2: the key-loop redesign (default); v1: the first kernel, kept until v2 ran on a GPU
IMPL_ENV = "HILT_KERNEL_IMPL"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the kernels can run here: triton installed, and CUDA present or the interpreter on."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # a broken or blocked triton
        return False
    import torch

    return torch.cuda.is_available() or _interpreting()


def default_impl() -> str:
    """``HILT_KERNEL_IMPL`` (v1 or v2) if set, else v2."""
    impl = os.environ.get(IMPL_ENV, "v2") or "v2"
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={impl!r}: expected one of {IMPLS}")
    return impl


def hilt_attention(q, k, v, scale=None, config=None, impl=None):
    """Fused ``q + softmax(q @ k^T * scale) @ v`` on [B, N', C] or [B, H, N', d]; differentiable.

    ``impl`` picks the kernel: ``"v2"`` (default) or ``"v1"`` (also via ``HILT_KERNEL_IMPL``);
    ``config`` overrides that kernel's tile choice (a ``FusedConfig`` for v2, a ``KernelConfig``
    for v1). ``k is v`` reads K once and returns one gradient.
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"hilt_attention: impl must be one of {IMPLS}, got {impl!r}")
    module = importlib.import_module("hilt_kernels.hilt_v2" if impl == "v2" else "hilt_kernels.hilt_v1")
    return module.hilt_attention(q, k, v, scale=scale, config=config)


__all__ = ["hilt_attention", "hilt_attention_reference", "triton_available", "default_impl", "IMPLS"]
