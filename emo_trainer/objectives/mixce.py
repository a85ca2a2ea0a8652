"""MixCE — mixture of forward and reverse cross-entropy (Zhang et al., ACL 2023, arXiv 2305.16958).

    MixCE(η) = η·CE(P, Q) + (1−η)·CE(Q, P)

The reverse term CE(Q, P) needs samples from the model; the paper approximates it token-wise
by re-weighting the forward cross-entropy with the model's (stop-gradient) gold probability:

    L_i = [η + (1−η)·sg(q_i[y_i])]·CE_i,    loss = token mean of L_i

η = 1 is exactly MLE; smaller η down-weights tokens the model finds unlikely (q_i[y_i] is
small), pushing it to be precise rather than to cover every mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.fused import softmax_stats
from .base import Objective, masked_mean
from .registry import register


@register
class MixceObjective(Objective):
    """MixCE, token-wise approximation (see the module docstring).

    Options:
        eta: η ∈ [0, 1], the weight of the forward cross-entropy (default 0.1, the
            authors' WikiText choice; 0.3 WebText, 0.7 WritingPrompts). η = 1 is MLE.
    """

    name = "mixce"

    def __init__(self, eta: float = 0.1) -> None:
        super().__init__()
        if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"MixCE eta must be in [0, 1] (1 = MLE), got {eta!r}")
        self.eta = float(eta)

    def options(self) -> dict[str, Any]:
        return {"eta": self.eta}

    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def token_stats(self, logits, targets, extras=None):
        # Fused CE (fused.py): autograd keeps only the logits, not log-softmax + an fp32 copy.
        return softmax_stats(logits, targets)

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        q_gold = torch.exp(-ce.detach())  # q_i[y_i], stop-gradient
        # η = 1 gives weight 1 + 0·q = 1 exactly, so the loss is bit-identical to MLE.
        weight = self.eta + (1.0 - self.eta) * q_gold
        per_token = weight * ce
        loss_sum = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        metrics = {"ce": masked_mean(ce, valid), "weight": masked_mean(weight, valid), "q_gold": masked_mean(q_gold, valid)}
        return loss_sum, metrics
