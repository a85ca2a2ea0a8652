"""Attention-kernel choice for arbitrary (tree) attention masks.

SequenceMatch feeds the model a 4-D mask (the backspace tree) whose length changes from step to
step.  On an H100 (torch 2.11) PyTorch's SDPA dispatcher picks the cuDNN backend for such masks,
and cuDNN builds a new graph on every call: ~8 ms of host time per attention call, forward and
backward (torch.profiler, GPT-2 B8×T1024: `aten::_cudnn_attention_forward` 94 ms and
`_cudnn_attention_backward` 95 ms of CPU time over 12 calls each, for 3.5 + 5.4 ms of GPU time),
which made a 78 ms-of-GPU-work step take 190 ms.  The memory-efficient kernel takes arbitrary
masks without a per-shape build.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

__all__ = ["sdpa_without_cudnn", "without_cudnn_sdpa"]


def sdpa_without_cudnn() -> AbstractContextManager:
    """Context in which ``scaled_dot_product_attention`` may use every backend except cuDNN
    (flash, memory-efficient, math, and device-specific overrides)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch: nothing to choose from
        return nullcontext()
    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "OVERRIDEABLE")
    backends = [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]
    return sdpa_kernel(backends)


def without_cudnn_sdpa(fn):
    """Decorator: run ``fn`` inside :func:`sdpa_without_cudnn`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sdpa_without_cudnn():
            return fn(*args, **kwargs)

    return wrapper
