"""MLE — maximum likelihood (next-token cross-entropy), with optional label smoothing and z-loss.

    L = (1/n_valid) Σ_valid ℓ_i,   ℓ_i = (1−ε)·CE_i + ε·S_i + β·lse_i²

    CE_i  = −log softmax(z_i)[y_i]
    S_i   = mean_v (−log q_i[v]) = lse_i − mean_v z_i[v]      (label smoothing ε, PyTorch's semantics)
    lse_i = logsumexp(z_i)                                    (z-loss β: PaLM's auxiliary term,
                                                               Liger-Kernel's ``lse_square_scale``)

With ε = β = 0 (the defaults) this is plain CE, bit-identical to the MLE of before the options
existed, and equal to ``transformers``' built-in causal-LM loss (``ForCausalLMLoss``) to 1e-6 in
fp32, including its ``num_items_in_batch`` reduction.  See docs/objectives.md.

Masked columns (logit −∞): the smoothing mean runs over the finite logits of the row only (a
masked column is not a possible token; PyTorch's own label smoothing would give +∞ there).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.fused import softmax_stats
from .base import Objective, masked_mean
from .registry import register


@register
class MleObjective(Objective):
    """Next-token cross-entropy (see the module docstring).

    Options:
        label_smoothing: ε ∈ [0, 1] (default 0): ℓ_i = (1−ε)·CE_i + ε·mean_v(−log q_i[v]),
            as ``torch.nn.functional.cross_entropy(label_smoothing=ε)``.
        z_loss: β ≥ 0 (default 0): adds β·(logsumexp z_i)² per token (PaLM uses 1e-4).
    """

    name = "mle"

    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def __init__(self, label_smoothing: float = 0.0, z_loss: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(label_smoothing, (int, float)) and math.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
            raise ValueError(f"mle label_smoothing must be in [0, 1] (0 = off, 0.1 is usual), got {label_smoothing!r}")
        if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0.0):
            raise ValueError(f"mle z_loss must be a number ≥ 0 (0 = off, PaLM used 1e-4), got {z_loss!r}")
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)

    def options(self) -> dict[str, Any]:
        return {"label_smoothing": self.label_smoothing, "z_loss": self.z_loss}

    def token_stats(self, logits, targets, extras=None):
        # Fused CE (fused.py): autograd keeps only the logits, not log-softmax + an fp32 copy.
        if not (self.label_smoothing or self.z_loss):
            return softmax_stats(logits, targets)
        # lse (and the mean of the finite logits) from the fused statistics, differentiable; their
        # gradients join CE's in one backward pass (nothing of N×V beyond the logits is kept)
        return softmax_stats(logits, targets, lse=True, logit_mean=bool(self.label_smoothing))

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        if not (self.label_smoothing or self.z_loss):
            loss_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
            return loss_sum, {"ce": masked_mean(ce, valid)}
        lse = stats["lse"]
        per_token = ce
        metrics = {"ce": masked_mean(ce, valid)}
        if self.label_smoothing:
            eps = self.label_smoothing
            smooth = lse - stats["logit_mean"]  # mean_v −log q_v over the finite columns
            per_token = (1.0 - eps) * ce + eps * smooth
            metrics["smooth_ce"] = masked_mean(smooth, valid)
        if self.z_loss:
            z_term = self.z_loss * lse.square()
            per_token = per_token + z_term
            metrics["lse"] = masked_mean(lse, valid)
            metrics["z_loss"] = masked_mean(z_term, valid)
        loss_sum = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        return loss_sum, metrics
