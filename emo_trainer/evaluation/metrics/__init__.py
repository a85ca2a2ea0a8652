"""Evaluation metrics: repetition/diversity, MAUVE, token-weighted perplexity.

Each is a set of plain functions (``repetition``, ``mauve``, ``perplexity``) and an ``evaluate``
module wrapping them (``modules/<name>.py``), usable offline::

    from emo_trainer.evaluation import metrics
    rep = metrics.load("repetition")                 # an evaluate.EvaluationModule
    evaluate.load(metrics.module_path("mauve"))      # the same through evaluate's own loader
    evaluate.combine([metrics.load("repetition"), metrics.load("mauve")])
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .repetition import distinct_n, diversity, mean_length, rep_n, repetition_metrics, seq_rep_n

MODULES = {"repetition": "Repetition", "mauve": "Mauve", "perplexity": "Perplexity"}

__all__ = [
    "MODULES",
    "distinct_n",
    "diversity",
    "load",
    "mean_length",
    "module_path",
    "rep_n",
    "repetition_metrics",
    "seq_rep_n",
]


def module_path(name: str) -> str:
    """Path of the ``evaluate`` module file of metric ``name`` (for ``evaluate.load``)."""
    if name not in MODULES:
        raise ValueError(f"unknown metric '{name}'; available: {', '.join(MODULES)}")
    return str(Path(__file__).parent / "modules" / f"{name}.py")


def load(name: str, **kwargs):
    """Instantiate the ``evaluate`` module of metric ``name`` directly (no copy to evaluate's cache).

    ``kwargs`` go to ``evaluate.EvaluationModule.__init__`` (e.g. ``keep_in_memory=True``).
    """
    module_path(name)  # validates the name
    module = importlib.import_module(f"{__name__}.modules.{name}")
    return getattr(module, MODULES[name])(**kwargs)
