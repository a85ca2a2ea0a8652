"""Training objectives: MLE, EMO, MixCE, MiLe and SequenceMatch-χ², and the ecosystem's
token-weighted objectives DFT, TaiLr, focal and EAFT (docs/objectives.md).

Usable without the Trainer::

    from emo_trainer.objectives import get_objective
    obj = get_objective("mixce", eta=0.1)
    out = obj(logits, labels, num_items_in_batch=None)   # out.loss, out.metrics
"""

from .base import IGNORE_INDEX, Objective, ObjectiveOutput, reduce_loss, shift_labels
from .chunked import chunked_objective_loss, chunked_token_stats
from .registry import ObjectiveError, available, get_objective, objective_class, objective_options, register

# Importing the modules registers the objectives.
from . import mle  # noqa: E402,F401

for _optional in ("emo", "mixce", "mile", "sequencematch", "dft", "tailr", "focal", "eaft"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _e:  # not written yet: stays in registry.PLANNED
        if _e.name != f"{__name__}.{_optional}":
            raise

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
