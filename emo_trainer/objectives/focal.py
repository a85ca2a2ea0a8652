"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), as the MiLe
authors (Su et al., NAACL 2024 Findings, arXiv 2310.19531) use it as a language-modelling baseline.

    q_y = sg(q_i[y_i]) = sg(exp(−CE_i))
    w_i = (1 − q_y)^γ
    α   = sg(n_valid / Σ_valid w_i)      over the whole optimizer step and all ranks
    L   = α · Σ_valid w_i·CE_i / n_valid

Tokens the model already predicts well (q_y → 1) are down-weighted; α keeps the loss on the CE
scale.  γ = 0 is exactly MLE (w = 1, α = 1).

The normaliser is MiLe's, and so is the machinery: :class:`FocalObjective` is MiLe with another
weight (``mile.py``: α of the whole optimizer step under ``ObjectiveTrainer``, applied to the
accumulated gradients after the step's last backward, all-reduced over data-parallel ranks, so
gradient accumulation equals the big batch and 2 processes equal 1 with the doubled batch).
When every valid token of the step has weight 0 (q_y = 1 exactly), α is 1 (the loss is 0).

Options:
    gamma: γ ≥ 0 (default 1.0, the MiLe authors' default).

Diagnostics: ``ce`` (plain CE), ``weight`` (mean w), ``q_gold`` (mean q_y), and ``alpha`` once
per optimizer step.  Cost: that of MLE.  See docs/objectives.md.
"""

from __future__ import annotations

import math

import torch

from ..ops.fused import softmax_stats
from .base import masked_mean
from .mile import MileObjective
from .registry import register


@register
class FocalObjective(MileObjective):
    """Focal loss with MiLe's step normaliser (see the module docstring).

    Options:
        gamma: γ ≥ 0 (default 1.0); 0 = MLE.
    """

    name = "focal"

    def __init__(self, gamma: float = 1.0) -> None:
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ValueError(f"focal gamma must be a number ≥ 0 (0 = MLE, default 1.0), got {gamma!r}")
        super().__init__(gamma=gamma)

    def token_stats(self, logits, targets, extras=None):
        # Only CE (fused.py): no entropy pass.
        return softmax_stats(logits, targets)

    def token_weights(self, stats, valid):
        ce = stats["ce"].detach()
        one_minus_q = (-torch.expm1(-ce)).clamp_min(0.0)  # 1 − q_y without cancellation near q_y = 1
        return one_minus_q.pow(self.gamma), {"q_gold": masked_mean(torch.exp(-ce), valid)}

    def _alpha(self, totals: torch.Tensor) -> torch.Tensor:
        # Unlike MiLe's (≥ 1), focal weights can all be 0: α = 1 then (the loss is 0 either way),
        # and a tiny Σw cannot overflow α to inf (inf·0 would be nan).
        n, w = totals[0], totals[1]
        alpha = (n / w.clamp_min(torch.finfo(w.dtype).tiny)).clamp_max(torch.finfo(w.dtype).max)
        return torch.where(w > 0, alpha, torch.ones_like(alpha))
