"""SequenceMatch-χ² with backspace: everything it needs, in one place.

* :mod:`.objective` — the loss (formula and paper in its docstring), registered as ``sequencematch``;
* :mod:`.backspace` — the ``<bkspc>`` action: adding the token, stripping its logit, applying it to text;
* :mod:`.tree` — backspace-augmented trajectories as tapes with ancestor attention masks;
* :mod:`.sampler` — generation with backspace (KV cache, tree masks);
* :mod:`.replay` — the replay buffer of model trajectories;
* :mod:`.attention` — SDPA backend selection for custom masks.
"""

from .backspace import BACKSPACE_TOKEN, add_backspace_token, backspace_token_id, strip_backspace_logits
from .objective import SequenceMatchObjective, policy_stats

__all__ = [
    "BACKSPACE_TOKEN",
    "SequenceMatchObjective",
    "add_backspace_token",
    "backspace_token_id",
    "policy_stats",
    "strip_backspace_logits",
]
