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

from .base import IGNORE_INDEX, Objective, ObjectiveOutput, shift_labels

DEFAULT_CHUNK_SIZE = 2048


class _ChunkedStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, objective, chunk_size, names, shapes, pos_extras):  # noqa: D401
        n = hidden.shape[0]
        outs = {name: hidden.new_empty((n, *shape), dtype=torch.float32) for name, shape in zip(names, shapes)}
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                logits = _chunk_logits(hidden[sl], weight, bias)
                stats = objective.token_stats(logits, targets[sl], {k: v[sl] for k, v in pos_extras.items()})
                for name in names:
                    outs[name][sl] = stats[name]
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias = bias is not None
        ctx.objective, ctx.chunk_size, ctx.names, ctx.pos_extras = objective, chunk_size, names, pos_extras
        return tuple(outs[name] for name in names)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_b and bias is not None) else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            sl = slice(start, min(start + ctx.chunk_size, n))
            gs = [g[sl] if g is not None else None for g in grads]
            if all(g is None or not g.any() for g in gs):
                continue
            with torch.enable_grad():
                h = hidden[sl].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                b = bias.detach().requires_grad_(need_b) if bias is not None else None
                logits = _chunk_logits(h, w, b)
                stats = ctx.objective.token_stats(
                    logits, targets[sl], {k: v[sl] for k, v in ctx.pos_extras.items()}
                )
                outs, gouts = [], []
                for name, g in zip(ctx.names, gs):
                    if g is not None and stats[name].requires_grad:
                        outs.append(stats[name])
                        gouts.append(g)
                inputs = [t for t, need in ((h, need_h), (w, need_w), (b, need_b and b is not None)) if need]
                if not outs or not inputs:
                    continue
                got = iter(torch.autograd.grad(outs, inputs, gouts, allow_unused=True))
            if need_h:
                g = next(got)
                if g is not None:
                    grad_h[sl] = g
            if need_w:
                g = next(got)
                if g is not None:
                    grad_w += g
            if need_b and bias is not None:
                g = next(got)
                if g is not None:
                    grad_b += g
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # The matmul runs in the model's dtype (bf16 under autocast), the statistics in fp32.
    logits = torch.nn.functional.linear(h, w.to(h.dtype) if w.dtype != h.dtype else w, None if b is None else b.to(h.dtype))
    return logits.float()


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
    probe = objective.token_stats(
        _chunk_logits(hidden[:1].detach(), weight.detach(), None if bias is None else bias.detach()),
        targets[:1],
        {k: v[:1] for k, v in pos_extras.items()},
    )
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
    targets = shift_labels(labels).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    valid = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~valid, 0)
    pos_extras = {
        k: extras[k].reshape(-1, *extras[k].shape[labels.dim():]) for k in objective.extra_position_keys if k in extras
    }
    stats = chunked_token_stats(objective, flat_hidden, weight, safe_targets, bias, pos_extras, chunk_size)
    return objective.finish(stats, valid, num_items_in_batch, extras)
