"""Triton kernel of EAFT's top-k entropy (``eaft.topk_entropy``) on GPUs, without sorting the row.

One program per row keeps the row's running k largest logits in registers (``K_PAD`` = the next
power of two ≥ k): for each block of ``BLOCK`` columns it takes the block's ``K_PAD`` largest
(``tl.topk``, a partial bitonic selection of one block) and merges them with the running ones —
and skips the block outright when its maximum does not beat the current k-th largest (after the
first blocks, most of a row).  The logits are read once, in their own dtype; nothing is written
but the (n,) entropies:

    H^k = log s − Σ_{j<k} e_j·t_j / s,   t_j = top_j − top_0 ≤ 0,  e_j = exp(t_j),  s = Σ e_j

Used when ``triton_stats.usable(logits)`` (CUDA, or CPU under the interpreter in the tests) and
``tl.topk`` exists; a Triton without it, or a kernel that fails to build, turns this kernel off
with one warning and ``torch.topk`` runs instead (the CE kernels are unaffected).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from . import triton_stats

try:  # optional, as in triton_stats.py
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  pragma: no cover - not installed or broken: torch.topk is used
    triton = None
    tl = None

logger = logging.getLogger(__name__)

_state = {"disabled": False}
_JITTED: dict[bool, object] = {}


def _topk_entropy_kernel(Z, stride_z, ENT, V: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    offs = tl.arange(0, BLOCK)
    idx = tl.arange(0, K_PAD)
    top = tl.full((K_PAD,), float("-inf"), tl.float32)  # running k largest, sorted descending
    for start in range(0, V, BLOCK):
        cols = start + offs
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        kth = tl.max(tl.where(idx == K - 1, top, float("-inf")), 0)  # the current k-th largest
        if tl.max(z, 0) > kth:  # else nothing of this block enters the top k
            merged = tl.reshape(tl.join(top, tl.topk(z, K_PAD)), (2 * K_PAD,))
            top = tl.topk(merged, K_PAD)
    top = tl.where(idx < K, top, float("-inf"))
    m = tl.max(top, 0)
    t = top - m
    e = tl.exp(t)  # −∞ (masked columns, padding) → 0
    s = tl.sum(e, 0)
    a = tl.sum(e * tl.maximum(t, -1e4), 0)  # t floored: 0·(−∞) would be nan (fused.LOG_FLOOR)
    tl.store(ENT + row, tl.log(s) - a / s)


def usable(logits: torch.Tensor) -> bool:
    return (not _state["disabled"] and triton_stats.usable(logits)
            and triton is not None and hasattr(tl, "topk") and hasattr(tl, "join"))


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor | None:
    """(n,) fp32 top-k entropies of ``logits`` (n, V), or None when the kernel is off or failed
    (the caller then uses ``torch.topk``).  ``k`` ≤ V."""
    n, vocab = logits.shape
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        if interpret not in _JITTED:
            _JITTED[interpret] = triton.jit(_topk_entropy_kernel)
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        if n == 0:
            return out
        k_pad = triton.next_power_of_2(k)
        block = max(k_pad, min(128 if interpret else 1024, triton.next_power_of_2(vocab)))
        on = torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext()
        with on:  # launch on the tensor's GPU even when another one is current
            _JITTED[interpret][(n,)](logits, logits.stride(0), out, vocab, K=k, K_PAD=k_pad, BLOCK=block,
                                     num_warps=4)
        return out
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        _state["disabled"] = True
        logger.warning("Triton kernel for EAFT's top-k entropy failed (%s: %s); using torch.topk instead "
                       "(same results).", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
