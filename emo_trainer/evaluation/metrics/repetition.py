"""Repetition and diversity of generated texts, on whitespace tokens (``docs/evaluation.md``).

    rep-n       = 1 − Σ_texts |distinct n-grams of the text| / Σ_texts |n-grams of the text|   (n = 2, 3, 4)
    diversity   = Π_{n=2..4} (1 − rep-n)                                  (Su et al. 2022, SimCTG)
    seq-rep-n   = mean over texts of 1 − |distinct n-grams| / |n-grams|   (Welleck et al. 2019; n = 4)
    distinct-n  = |distinct n-grams over all texts| / |n-grams over all texts|   (Li et al. 2016; n = 1, 2)

Tokens are ``text.split()`` (any run of whitespace separates; no lower-casing, punctuation stays
attached), so the numbers do not depend on any model's tokenizer and are comparable across runs.

Corner cases (the spec is silent; chosen so that degenerate output never looks good):

* A text shorter than ``n`` words has no n-grams: it adds nothing to the sums of rep-n and
  distinct-n, and it is left out of the mean of seq-rep-n (its ratio is undefined, not 0).
* When a whole set of texts has no n-gram at all (e.g. every text empty), the distinct ratio is
  taken as 0: rep-n = 1, diversity = 0, distinct-n = 0, seq-rep-n = 1 — the worst values, so a
  model that generates nothing cannot win on these metrics. There is never a division by zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "distinct_n",
    "diversity",
    "mean_length",
    "ngrams",
    "rep_n",
    "repetition_metrics",
    "seq_rep_n",
]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (an empty list when ``len(tokens) < n``)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _tokens(texts: Iterable[str]) -> list[list[str]]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string")
    return [t.split() for t in texts]


def rep_n(texts: Iterable[str], n: int) -> float:
    """1 − Σ |distinct n-grams per text| / Σ |n-grams per text| (1.0 when there is no n-gram at all)."""
    distinct = total = 0
    for toks in _tokens(texts):
        grams = ngrams(toks, n)
        distinct += len(set(grams))
        total += len(grams)
    return 1.0 - (distinct / total if total else 0.0)


def diversity(texts: Iterable[str], ns: Sequence[int] = (2, 3, 4)) -> float:
    """Π_n (1 − rep-n) over ``ns`` (SimCTG's diversity)."""
    texts = list(texts)
    out = 1.0
    for n in ns:
        out *= 1.0 - rep_n(texts, n)
    return out


def seq_rep_n(texts: Iterable[str], n: int = 4) -> float:
    """Mean over texts with at least one n-gram of 1 − |distinct n-grams| / |n-grams| (1.0 if none has one)."""
    values = []
    for toks in _tokens(texts):
        grams = ngrams(toks, n)
        if grams:
            values.append(1.0 - len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else 1.0


def distinct_n(texts: Iterable[str], n: int) -> float:
    """|distinct n-grams over all texts| / |n-grams over all texts| (0.0 when there is none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for toks in _tokens(texts):
        grams = ngrams(toks, n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def mean_length(texts: Iterable[str]) -> float:
    """Mean number of whitespace tokens per text (0.0 for no texts)."""
    lengths = [len(t) for t in _tokens(texts)]
    return sum(lengths) / len(lengths) if lengths else 0.0


def repetition_metrics(texts: Iterable[str]) -> dict[str, float]:
    """Every repetition/diversity number of the spec for one set of texts, under its log name."""
    texts = list(texts)
    out = {f"rep_{n}": rep_n(texts, n) for n in (2, 3, 4)}
    out["diversity"] = (1.0 - out["rep_2"]) * (1.0 - out["rep_3"]) * (1.0 - out["rep_4"])
    out["seq_rep_4"] = seq_rep_n(texts, 4)
    out["distinct_1"] = distinct_n(texts, 1)
    out["distinct_2"] = distinct_n(texts, 2)
    out["mean_length"] = mean_length(texts)
    return out
