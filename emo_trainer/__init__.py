"""emo-trainer: train causal LMs with MLE, EMO, MixCE, MiLe or SequenceMatch-χ² on the HF Trainer.

Main entry points: :class:`ObjectiveTrainer`, :func:`emo_trainer.objectives.get_objective`,
:func:`emo_trainer.config.load_config`, and ``scripts/train.py``.
"""

__version__ = "0.1.0"

__all__ = ["ObjectiveTrainer", "__version__", "get_objective", "load_config"]

from . import _compat

_compat.install()  # old module paths (emo_trainer.backspace, emo_trainer.metrics, ...) keep importing


def __getattr__(name):  # lazy: importing the package does not import the Trainer stack
    if name == "ObjectiveTrainer":
        from .trainer import ObjectiveTrainer

        return ObjectiveTrainer
    if name == "get_objective":
        from .objectives import get_objective

        return get_objective
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'emo_trainer' has no attribute {name!r}")
