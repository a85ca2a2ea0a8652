"""MLE — maximum likelihood (next-token cross-entropy).

    L = (1/n_valid) Σ_valid CE_i,   CE_i = −log softmax(z_i)[y_i]

Equals ``transformers``' built-in causal-LM loss (``ForCausalLMLoss``) to 1e-6 in fp32,
including its ``num_items_in_batch`` reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective, masked_mean
from .registry import register


@register
class MleObjective(Objective):
    """Plain next-token cross-entropy.  No options."""

    name = "mle"

    def token_stats(self, logits, targets, extras=None):
        return {"ce": F.cross_entropy(logits, targets, reduction="none")}

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        loss_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
        return loss_sum, {"ce": masked_mean(ce, valid)}
