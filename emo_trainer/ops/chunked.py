"""Chunked loss path: objective statistics from hidden states without N×V logits.

The logits of ``chunk_size`` positions at a time are computed from the final hidden
states ``h`` (N×d) and the lm_head weight ``W`` (V×d), reduced to the objective's
per-position statistics (``Objective.token_stats``) and dropped.  In the backward pass
each chunk's logits are recomputed and the incoming gradients of the statistics are
pushed through them into ``h`` and ``W`` — so peak memory holds one chunk of logits,
never all N×V, whatever the objective.  Because every objective is written as
``combine(token_stats(logits))``, this path computes the same function as the
full-logit path (tested to 1e-5 in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput, check_labels, shift_labels
from .fused import GEMM_ALIGN, no_autocast, pad_rows, row_stats_cache

DEFAULT_CHUNK_SIZE = 2048


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own lm_head matmul would run in (autocast's, when it is on)."""
    kind = hidden.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # device types without autocast support
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


#: the head's rows are padded with zeros to a multiple of this for the chunk matmuls (odd
#: vocabularies make cuBLAS pick slow kernels); the padded columns are sliced off before the statistics.
VOCAB_ALIGN = GEMM_ALIGN


def _padded_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """(W, b) in ``dtype`` with V rounded up to ``VOCAB_ALIGN`` rows of zeros (:func:`fused.pad_rows`)."""
    return pad_rows(weight.detach(), dtype), None if bias is None else pad_rows(bias.detach(), dtype)


def _stats_input(objective: Objective, logits: torch.Tensor) -> torch.Tensor:
    # The same logits token_stats gets on the full path (Objective.__call__).
    if objective.fp32_math_inside and logits.dtype in (torch.bfloat16, torch.float16):
        return logits
    return logits.float()


class _ChunkedStats(torch.autograd.Function):
    """``objective.token_stats(hidden @ weight.T + bias)`` one chunk of rows at a time.

    Forward: each chunk's logits are computed, reduced to statistics and dropped; only
    ``hidden``, ``weight``, ``bias`` and ``targets`` are kept for backward (no N×V tensor).
    Backward: each chunk's logits are recomputed, the statistics' gradients are pushed through
    ``token_stats`` (its own autograd or closed-form backward; the fused statistics of
    ``fused.py`` replay their forward-pass row vectors instead of recomputing them) into d logits, and then into
    ``hidden`` (d logits · W) and ``weight`` (Σ_chunks d logitsᵀ · h, accumulated in fp32).
    The matmuls run in the dtype the model's lm_head would use (autocast's under autocast),
    in both passes, so the recomputed logits are bit-identical to the forward ones.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, objective, chunk_size, names, shapes, pos_extras):
        mm_dtype = _matmul_dtype(hidden, weight)
        n = hidden.shape[0]
        outs = {name: hidden.new_empty((n, *shape), dtype=torch.float32) for name, shape in zip(names, shapes)}
        row_stats = []  # per chunk: the fused statistics' row vectors, replayed in backward
        vocab = weight.shape[0]
        with torch.no_grad(), no_autocast(hidden.device):
            w, b = _padded_head(weight, bias, mm_dtype)
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                # a (rows × V) view of the aligned (rows × V_pad) product: the statistics read rows with a stride
                logits = _stats_input(objective, F.linear(hidden[sl].to(mm_dtype), w, b)[:, :vocab])
                row_stats.append([])
                with row_stats_cache(row_stats[-1]):
                    stats = objective.token_stats(logits, targets[sl], {k: v[sl] for k, v in pos_extras.items()})
                for name in names:
                    outs[name][sl] = stats[name]
                del logits, stats
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias, ctx.mm_dtype = bias is not None, mm_dtype
        ctx.objective, ctx.chunk_size, ctx.names, ctx.pos_extras = objective, chunk_size, names, pos_extras
        ctx.row_stats = row_stats
        ctx.set_materialize_grads(False)
        return tuple(outs[name] for name in names)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2] and bias is not None
        grad_h = torch.zeros_like(hidden) if need_h else None
        if not (need_h or need_w or need_b) or all(g is None for g in grads):
            return (grad_h,) + (None,) * 8
        mm_dtype = ctx.mm_dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        with no_autocast(hidden.device):
            w, b = _padded_head(weight, bias, mm_dtype)
            rows = w.shape[0]
            # fp32 accumulators for the sums over chunks (the parameters may be bf16), padded like W
            grad_w = torch.zeros((rows, weight.shape[1]), dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(rows, dtype=torch.float32, device=weight.device) if need_b else None
            g_pad = None  # (rows × V_pad) d logits with zero padding columns: aligned K for the two matmuls
            for start in range(0, n, ctx.chunk_size):
                sl = slice(start, min(start + ctx.chunk_size, n))
                h = hidden[sl].detach().to(mm_dtype)
                with torch.no_grad():
                    logits = _stats_input(ctx.objective, F.linear(h, w, b)[:, :vocab]).detach()
                logits.requires_grad_(True)
                with torch.enable_grad(), row_stats_cache(ctx.row_stats[start // ctx.chunk_size], replay=True):
                    stats = ctx.objective.token_stats(
                        logits, targets[sl], {k: v[sl] for k, v in ctx.pos_extras.items()}
                    )
                    outs, gouts = [], []
                    for name, g in zip(ctx.names, grads):
                        if g is not None and stats[name].requires_grad:
                            outs.append(stats[name])
                            gouts.append(g[sl])
                    if not outs:
                        continue
                    (g_logits,) = torch.autograd.grad(outs, (logits,), gouts, allow_unused=True)
                del stats, outs, logits
                if g_logits is None:
                    continue
                if rows != vocab:
                    if g_pad is None or g_pad.shape[0] != g_logits.shape[0]:
                        g_pad = torch.zeros((g_logits.shape[0], rows), dtype=mm_dtype, device=g_logits.device)
                    g_pad[:, :vocab].copy_(g_logits)
                    g_logits = g_pad
                else:
                    g_logits = g_logits.to(mm_dtype)
                if need_h:
                    grad_h[sl] = g_logits @ w
                if need_w:
                    if mm_dtype == torch.float32:
                        grad_w.addmm_(g_logits.T, h)
                    else:
                        grad_w += g_logits.T @ h
                if need_b:
                    grad_b += g_logits.sum(0, dtype=torch.float32)
                del g_logits
        grad_w = grad_w[:vocab].to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b[:vocab].to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_token_stats(
    objective: Objective,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_extras: dict[str, torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """``objective.token_stats`` of ``hidden @ weight.T (+ bias)`` without holding all logits.

    ``hidden`` is (n, d), ``weight`` (V, d), ``targets`` (n,) valid ids.  Returns the same
    dict of (n,) (or (n, k)) tensors as the full path, differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    pos_extras = pos_extras or {}
    mm_dtype = _matmul_dtype(hidden, weight)
    with torch.no_grad(), no_autocast(hidden.device):  # one row, to learn the statistics' names and shapes
        # computed in the weight's dtype (no copy of W), handed over in the chunks' dtype, so the
        # objective sees the same logits dtype as in the chunks (EMO caches per dtype)
        row = F.linear(hidden[:1].to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        row = row.to(mm_dtype)
        probe = objective.token_stats(_stats_input(objective, row), targets[:1], {k: v[:1] for k, v in pos_extras.items()})
    names = tuple(probe)
    shapes = tuple(tuple(probe[name].shape[1:]) for name in names)  # () for (n,) stats, (k,) for (n, k)
    outs = _ChunkedStats.apply(hidden, weight, bias, targets, objective, chunk_size, names, shapes, pos_extras)
    return dict(zip(names, outs))


def chunked_objective_loss(
    objective: Objective,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **extras: Any,
) -> ObjectiveOutput:
    """The objective's loss from final hidden states ``(..., T, d)`` and the lm_head.

    Same arguments and result as ``objective(logits, labels, num_items_in_batch)``, with
    ``logits = hidden @ weight.T + bias`` never materialised.
    """
    check_labels(labels, hidden.shape[:-1], weight.shape[0], values=not objective.defer_metrics, what="hidden states")
    targets = shift_labels(labels).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    valid = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~valid, 0)
    pos_extras = {
        k: extras[k].reshape(-1, *extras[k].shape[labels.dim():]) for k in objective.extra_position_keys if k in extras
    }
    stats = chunked_token_stats(objective, flat_hidden, weight, safe_targets, bias, pos_extras, chunk_size)
    return objective.finish(stats, valid, num_items_in_batch, extras)
