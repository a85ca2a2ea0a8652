"""Training objectives: MLE, EMO, MixCE, MiLe and SequenceMatch-χ², and the ecosystem's
token-weighted objectives DFT, TaiLr, focal and EAFT (docs/objectives.md).

Usable without the Trainer::

    from emo_trainer.objectives import get_objective
    obj = get_objective("mixce", eta=0.1)
    out = obj(logits, labels, num_items_in_batch=None)   # out.loss, out.metrics
"""

# Importing the modules registers the objectives.
from . import dft, eaft, emo, focal, mile, mixce, mle, sequencematch, tailr  # noqa: F401
from .base import IGNORE_INDEX, Objective, ObjectiveOutput, reduce_loss, shift_labels
from .registry import ObjectiveError, available, get_objective, objective_class, objective_options, register


def __getattr__(name):
    # the chunked path lives with the kernels (emo_trainer.ops.chunked), which imports objectives.base:
    # loaded on first use so that either package can be imported first
    if name in ("chunked_objective_loss", "chunked_token_stats"):
        from ..ops import chunked

        return getattr(chunked, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "Objective",
    "ObjectiveError",
    "ObjectiveOutput",
    "available",
    "chunked_objective_loss",
    "chunked_token_stats",
    "get_objective",
    "objective_class",
    "objective_options",
    "reduce_loss",
    "register",
    "shift_labels",
]
