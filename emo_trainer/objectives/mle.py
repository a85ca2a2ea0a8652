"""MLE — maximum likelihood (next-token cross-entropy).

    L = (1/n_valid) Σ_valid CE_i,   CE_i = −log softmax(z_i)[y_i]

Equals ``transformers``' built-in causal-LM loss (``ForCausalLMLoss``) to 1e-6 in fp32,
including its ``num_items_in_batch`` reduction.
"""

from __future__ import annotations

import torch

from ..ops.fused import softmax_stats
from .base import Objective, masked_mean
from .registry import register


@register
class MleObjective(Objective):
    """Plain next-token cross-entropy.  No options."""

    name = "mle"

    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def token_stats(self, logits, targets, extras=None):
        # Fused CE (fused.py): autograd keeps only the logits, not log-softmax + an fp32 copy.
        return softmax_stats(logits, targets)

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        loss_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
        return loss_sum, {"ce": masked_mean(ce, valid)}
