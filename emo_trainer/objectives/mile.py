"""MiLe — entropy-weighted cross-entropy (Su et al., NAACL 2024 Findings, arXiv 2310.19531).

    H_i = −Σ_v sg(q_i[v])·log sg(q_i[v])           (entropy of the model's prediction, fp32)
    w_i = (σ + H_i)^γ,  σ = 1
    α   = sg(n_valid / Σ_valid w_i)                  (keeps the loss on the CE scale)
    L   = α · Σ_valid w_i·CE_i / n_valid

Tokens the model is uncertain about (high entropy) get more weight; γ = 0 is exactly MLE.

Data parallelism: when ``torch.distributed`` is initialised, n_valid and Σ w_i are summed
over ranks (one all-reduce) before α is formed, so α = Σ_r n_r / Σ_r W_r is the normaliser of
the global batch and 2 processes give exactly the loss of 1 process with the doubled batch
(the equality docs/objectives.md's reduction section requires; tested).  The
authors instead average α itself over ranks, mean_r(n_r / W_r); the two agree only when every
rank has the same mean weight W_r / n_r (e.g. n = 10 on both ranks with W = 20 and 30: mean
0.417 vs 0.400).  We chose the global ratio for the exact equality.  Every rank must therefore
call the loss the same number of times.

Gradient accumulation: under :class:`~emo_trainer.trainer.ObjectiveTrainer` it is exact.  The
trainer sets ``defer_step_scale``: each micro-batch's loss is Σ w_i·CE_i / n_total without α and
records its (n_valid, Σw); after the step's last backward the trainer forms α from the step's
totals (all-reduced over ranks) and multiplies the accumulated gradients, and the logged loss,
by it — before gradient clipping.  So k micro-batches equal one batch k times larger (tested,
γ = 1 and 2), and ``alpha`` is logged once per optimizer step.  (Under DeepSpeed, which owns the
gradients, and when the objective is called directly, α is formed per call as above: k calls
then give Σ_m α_m·Σ_{i∈m} w_i·CE_i / n_total, each micro-batch's weights relative to its own
mean — two deliberately different micro-batches gave 11% in loss and 28% in gradient.)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.fused import softmax_stats
from .base import Objective, masked_mean
from .registry import register

SIGMA = 1.0


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@register
class MileObjective(Objective):
    """MiLe loss, entropy-weighted CE with a global normaliser (see the module docstring).

    Options:
        gamma: γ, the exponent of the weight (1 + H_i)^γ (default 1.0, the paper's value).
            γ = 0 is MLE; larger γ favours high-entropy tokens more.
    """

    name = "mile"
    step_scale_name = "alpha"

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(gamma):
            raise ValueError(f"MiLe gamma must be a finite number (0 = MLE), got {gamma!r}")
        self.gamma = float(gamma)
        self._step_parts: list[torch.Tensor] = []  # (n_valid, Σw) per micro-batch, with defer_step_scale

    def options(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def token_stats(self, logits, targets, extras=None):
        # CE and H from one fused pass (fused.py): autograd keeps only the logits.  H is a
        # stop-gradient weight: combine() detaches it, so its gradient is never computed.
        return softmax_stats(logits, targets, entropy=True)

    def token_weights(self, stats, valid):
        """``(w, diagnostics)``: the (n,) stop-gradient weights (any value at invalid positions).
        The hook ``focal`` overrides (focal.py): the step normaliser α below is shared."""
        entropy = stats["entropy"].detach()
        return (SIGMA + entropy).pow(self.gamma), {"entropy": masked_mean(entropy, valid)}

    def combine(self, stats, valid, extras=None):
        ce = stats["ce"]
        raw, diagnostics = self.token_weights(stats, valid)
        weight = torch.where(valid, raw, torch.zeros_like(raw))
        parts = torch.stack([valid.sum().to(weight.dtype), weight.sum()])
        per_token = weight * ce
        weighted = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        metrics = {"ce": masked_mean(ce, valid), **diagnostics, "weight": masked_mean(weight, valid)}
        if self.defer_step_scale:  # α of the whole step is applied by the trainer (take_step_scale)
            self._step_parts.append(parts.detach())
            return weighted, metrics
        # One all-reduce of (n_valid, Σw): α of the global batch, identical on every rank.
        alpha = self._alpha(_all_reduce_sum(parts))
        metrics["alpha"] = alpha
        return alpha * weighted, metrics

    def take_step_scale(self, device=None):
        if self._step_parts:
            totals = torch.stack(self._step_parts).sum(0)
        else:  # every micro-batch of the step skipped here: a zero share, but still in the all-reduce
            totals = torch.zeros(2, device=device)
        self._step_parts = []
        return self._alpha(_all_reduce_sum(totals))

    def discard_step_part(self):
        if self._step_parts:
            self._step_parts.pop()

    def reset_step_scale(self):
        self._step_parts = []

    def _alpha(self, totals: torch.Tensor) -> torch.Tensor:
        return _alpha(totals)


def _alpha(totals: torch.Tensor) -> torch.Tensor:
    """α = n_valid / Σw from ``(n_valid, Σw)``.  No valid token anywhere: Σw = 0 and α would be
    0/0; any finite α then gives a zero loss."""
    return totals[0] / totals[1].clamp_min(torch.finfo(totals.dtype).tiny)
