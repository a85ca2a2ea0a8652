"""Evaluation: everything measured on a model, during training or on a saved checkpoint.

* :mod:`.config` — the ``eval:`` options (:class:`EvalConfig`);
* :mod:`.prompts` — prompt/reference pairs cut from evaluation documents;
* :mod:`.generation` — sampling continuations (sharded over processes by :mod:`.sharding`);
* :mod:`.callback` — :class:`GenerationEvalCallback`, the metrics at every ``evaluate()``;
* :mod:`.metrics` — repetition/diversity, MAUVE, perplexity, and their ``evaluate`` modules.

Names are loaded on first use, so importing this package does not import the Trainer stack.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EvalConfig": ".config",
    "Prompt": ".prompts",
    "build_prompts": ".prompts",
    "generate_continuations": ".generation",
    "sample_continuations": ".generation",
    "GenerationEvalCallback": ".callback",
    "aggregate_seeds": ".callback",
    "build_generation_callback": ".callback",
}

__all__ = [
    "EvalConfig",
    "GenerationEvalCallback",
    "Prompt",
    "aggregate_seeds",
    "build_generation_callback",
    "build_prompts",
    "generate_continuations",
    "sample_continuations",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
