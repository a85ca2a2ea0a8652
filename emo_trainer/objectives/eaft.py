"""EAFT — Entropy-Adaptive Fine-Tuning (arXiv 2601.02151; LLaMA-Factory ``use_eaft_loss``,
axolotl ``use_eaft``).

    p^k_i  = softmax of the top-k logits of z_i (renormalised over those k)
    H^k_i  = −Σ_{j ≤ k} p^k_i[j]·log p^k_i[j]        (stop-gradient)
    w_i    = (H^k_i / c)^α
    L_i    = w_i·CE_i,   loss = Σ_valid L_i / num_items_in_batch

Tokens where the model hesitates among its top candidates (high top-k entropy) keep their
gradient; tokens it is confidently sure about (low entropy, e.g. a confident conflict with the
label) are damped.  α = 0 is exactly MLE.

Options:
    alpha: the exponent α ≥ 0 (default 1.0).
    top_k: k ≥ 1 (default 20), capped at the vocabulary size.
    normalizer: c > 0 (default 3.0 ≈ ln 20, the authors' and LLaMA-Factory's constant; axolotl
        uses 1.0 — set ``normalizer: 1.0`` to match it).

Diagnostics: ``ce`` (plain CE), ``weight`` (mean w), ``topk_entropy`` (mean H^k).
Cost: MLE's fused CE plus one top-k selection per row, without gradient and keeping nothing for
backward: on GPUs a Triton kernel (``triton_topk.py``: one read of the row, running top-k merged
block by block, no sort of the row), elsewhere ``torch.topk`` (a selection, not a sort).  On the
chunked path the top-k is recomputed with each chunk in the backward pass.  See docs/objectives.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops import triton_topk
from ..ops.fused import no_autocast, softmax_stats
from .base import masked_mean
from .registry import register
from .weighted import TokenWeightedObjective

#: fp32 elements of one block of rows of the top-k (its temporaries are k wide: small).
BLOCK_ELEMENTS = 1 << 25
#: floor of t = top − max where it multiplies e = exp(t): a −∞ logit gives 0·(finite) = 0, not nan.
LOG_FLOOR = -1e4



def topk_entropy(logits: torch.Tensor, k: int, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """(n,) entropy of the softmax over the ``k`` largest logits of each row, fp32, no gradient.

    Rows are processed in blocks; ``torch.topk`` selects without sorting the whole row.  −∞ logits
    among the top k (fewer than k finite columns) get probability 0 and add nothing.
    """
    n, vocab = logits.shape
    k = min(int(k), vocab)
    if triton_topk.usable(logits):  # GPUs: one read of the row, no sort (emo_trainer/ops/triton_topk.py)
        out = triton_topk.topk_entropy(logits.detach(), k)
        if out is not None:
            return out
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(n, dtype=ct, device=logits.device)
    with torch.no_grad(), no_autocast(logits.device):
        rows = max(1, block_elements // max(vocab, 1))
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            top = logits[sl].detach().topk(k, dim=-1, sorted=False).values.to(ct)
            m = top.amax(-1, keepdim=True)
            t = top - m  # ≤ 0; −∞ for masked columns
            e = t.exp()
            s = e.sum(-1)
            out[sl] = s.log() - (e * t.clamp_min(LOG_FLOOR)).sum(-1) / s
    return out


@register
class EaftObjective(TokenWeightedObjective):
    """EAFT: CE weighted by the normalised top-k entropy (see the module docstring).

    Options:
        alpha: α ≥ 0 (default 1.0); 0 = MLE.
        top_k: k ≥ 1 (default 20; min(k, V) is used).
        normalizer: c > 0 (default 3.0; axolotl uses 1.0).
    """

    name = "eaft"

    def __init__(self, alpha: float = 1.0, top_k: int = 20, normalizer: float = 3.0) -> None:
        super().__init__()
        if not (math.isfinite(alpha) and alpha >= 0.0):
            raise ValueError(f"eaft alpha must be a number ≥ 0 (0 = MLE, default 1.0), got {alpha!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"eaft top_k must be an integer ≥ 1 (default 20), got {top_k!r}")
        if not (math.isfinite(normalizer) and normalizer > 0.0):
            raise ValueError(f"eaft normalizer must be a number > 0 (3.0 ≈ ln 20, axolotl uses 1.0), got {normalizer!r}")
        self.alpha = float(alpha)
        self.top_k = int(top_k)
        self.normalizer = float(normalizer)

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "top_k": self.top_k, "normalizer": self.normalizer}

    def token_stats(self, logits, targets, extras=None):
        stats = softmax_stats(logits, targets)
        stats["topk_entropy"] = topk_entropy(logits, self.top_k)
        return stats

    def token_weights(self, stats, valid):
        h = stats["topk_entropy"].detach()
        weight = (h / self.normalizer).pow(self.alpha)
        return weight, {"topk_entropy": masked_mean(h, valid)}
