"""Shared code of the token-weighted objectives (``dft``, ``tailr``, ``eaft``; docs/objectives.md).

Each is L_i = sg(w_i)·CE_i, reduced like every objective (Σ_valid / num_items_in_batch).  A
subclass supplies the weight (:meth:`TokenWeightedObjective.token_weights`, from the
per-position statistics; it is detached here) and, when it needs more than CE, the statistics
(:meth:`token_stats`).  The logs get ``ce`` (plain cross-entropy: a weighted loss reads far below
it), ``weight`` (the mean weight) and the subclass's own diagnostics.
"""

from __future__ import annotations

import torch

from ..ops.fused import softmax_stats
from .base import Objective, masked_mean


class TokenWeightedObjective(Objective):
    """Σ_valid sg(w_i)·CE_i with a per-token weight from :meth:`token_weights`."""

    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def token_stats(self, logits, targets, extras=None):
        # Fused CE (fused.py, Triton on GPUs): autograd keeps only the logits.
        return softmax_stats(logits, targets)

    def token_weights(self, stats: dict[str, torch.Tensor], valid: torch.Tensor):
        """``(w, diagnostics)``: the (n,) weights (any values at invalid positions) and extra metrics."""
        raise NotImplementedError

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        raw, diagnostics = self.token_weights(stats, valid)
        weight = torch.where(valid, raw.detach(), torch.zeros_like(ce))
        loss_sum = torch.where(valid, weight * ce, torch.zeros_like(ce)).sum()
        return loss_sum, {"ce": masked_mean(ce, valid), "weight": masked_mean(weight, valid), **diagnostics}


def gold_probability(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """q_y = sg(exp(−CE_i)), fp32."""
    return torch.exp(-stats["ce"].detach())
