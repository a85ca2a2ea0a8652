"""DFT — Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement
Learning Perspective with Reward Rectification", arXiv 2508.05629).

    L_i = sg(q_i[y_i])·CE_i,   loss = Σ_valid L_i / num_items_in_batch

Each token's cross-entropy is scaled by the model's own (stop-gradient) probability of the gold
token, so the gradient of a token is that of its probability, q_y·∇log q_y = ∇q_y.  The same
objective as TRL's ``SFTConfig(loss_type="dft")``, Liger-Kernel's ``use_token_scaling=True`` and
LLaMA-Factory's ``use_dft_loss``; identical to ``mixce`` with η = 0 (kept as its own name because
users search for it).

No options.  Diagnostics: ``ce`` (plain CE: the DFT loss reads 10–20× below it early in
training, which is expected), ``weight`` (mean q_y).  Cost: that of MLE (the fused CE of
fused.py; the weight is exp of a length-n vector).  See docs/objectives.md.
"""

from __future__ import annotations

from .registry import register
from .weighted import TokenWeightedObjective, gold_probability


@register
class DftObjective(TokenWeightedObjective):
    """DFT: CE weighted by sg(q_y) (see the module docstring).  No options."""

    name = "dft"

    def token_weights(self, stats, valid):
        return gold_probability(stats), {}
