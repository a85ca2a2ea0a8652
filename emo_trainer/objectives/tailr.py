"""TaiLr — total-variation-guided token weighting (Ji et al., "Tailoring Language Generation Models
under Total Variation Distance", ICLR 2023; the authors' fairseq criterion ``tailr``).

    q_y = sg(q_i[y_i]) = sg(exp(−CE_i))
    w_i = clamp(q_y / (γ + (1−γ)·q_y), min_weight, 1)
    L_i = w_i·CE_i,   loss = Σ_valid L_i / num_items_in_batch

The weight estimates the (clipped) density ratio between the model and the γ-mixture of data and
model, down-weighting tokens the model finds unlikely — a bound on total variation instead of
KL.  γ = 0 is exactly MLE (w = 1); γ = 1 is DFT with the floor ``min_weight``.

Options:
    gamma: γ ∈ [0, 1], the authors' ``--density-ratio-threshold`` (default 1e-7, their
        long-text setting).
    min_weight: the floor of the weight, in [0, 1] (default 0.2, their setting).

Diagnostics: ``ce`` (plain CE), ``weight`` (mean w), ``q_gold`` (mean q_y).  Cost: that of MLE.
See docs/objectives.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import masked_mean
from .registry import register
from .weighted import TokenWeightedObjective, gold_probability


@register
class TailrObjective(TokenWeightedObjective):
    """TaiLr (see the module docstring).

    Options:
        gamma: γ ∈ [0, 1] (default 1e-7); 0 = MLE.
        min_weight: weight floor in [0, 1] (default 0.2).
    """

    name = "tailr"

    def __init__(self, gamma: float = 1e-7, min_weight: float = 0.2) -> None:
        super().__init__()
        if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"tailr gamma must be in [0, 1] (0 = MLE, the authors use 1e-7), got {gamma!r}")
        if not (math.isfinite(min_weight) and 0.0 <= min_weight <= 1.0):
            raise ValueError(f"tailr min_weight must be in [0, 1] (the authors use 0.2), got {min_weight!r}")
        self.gamma = float(gamma)
        self.min_weight = float(min_weight)

    def options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "min_weight": self.min_weight}

    def token_weights(self, stats, valid):
        q = gold_probability(stats)
        if self.gamma == 0.0:
            # q / q = 1, also where q underflows to 0 (0/0): exactly MLE
            weight = torch.ones_like(q)
        else:
            weight = (q / (self.gamma + (1.0 - self.gamma) * q)).clamp(self.min_weight, 1.0)
        return weight, {"q_gold": masked_mean(q, valid)}
