"""Known-distribution lab: languages with a known P, models of them, and exact metrics.

See ``docs/known_p.md`` and ``scripts/known_p_lab.py``.
"""

from .bigram import BigramConfig, BigramLM
from .markov import MarkovChain, generate_chain, load_chain, load_sequences, make_tokenizer, write_dataset
from .metrics import (
    REVERSE_KL_EPS,
    context_free_table,
    contextual_metrics,
    evaluate_model,
    exact_metrics,
    row_divergences,
)

__all__ = [
    "REVERSE_KL_EPS",
    "BigramConfig",
    "BigramLM",
    "MarkovChain",
    "context_free_table",
    "contextual_metrics",
    "evaluate_model",
    "exact_metrics",
    "generate_chain",
    "load_chain",
    "load_sequences",
    "make_tokenizer",
    "row_divergences",
    "write_dataset",
]
