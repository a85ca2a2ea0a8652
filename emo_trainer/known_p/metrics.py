"""Exact distances between a trained model Q and the known chain P.

All divergences use natural logarithms (nats) and the convention 0·log 0 = 0.  For one
context (row) with true next-token distribution ``p`` and model distribution ``q``:

* **JS**: Jensen–Shannon *divergence* ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2, in [0, ln 2]
  (not the JS distance, which is its square root).
* **forward KL** KL(p‖q) = Σ_j p_j log(p_j/q_j): finite for a softmax model.
* **impossible mass** Σ_{j: p_j = 0} q_j: probability the model gives to transitions the
  language never makes (MixCE's "over-generalisation").
* **reverse KL** KL(q‖p) is +∞ whenever the model puts any mass where p = 0, which a softmax
  model always does — so the exact value carries no information.  We report two finite
  versions instead, and the impossible mass next to them:
  - ``rkl``: ε-clipped, Σ_j q_j log(q_j / max(p_j, ε)) with ε = :data:`REVERSE_KL_EPS` (1e-6).
    Its impossible part is about m·log(m/(k·ε)) for mass m spread over k impossible tokens,
    so it grows as the model over-generalises; it is only comparable at the same ε.
  - ``rkl_support``: KL(q̃‖p) with q̃ = q restricted to the support of p and renormalised
    (how well the model shapes the possible transitions, ignoring the impossible ones).

Model distributions are over the model's vocabulary.  Columns beyond the language's
``V + 3`` tokens (SequenceMatch's ``<bkspc>``) are dropped and q renormalised, as
``docs/evaluation.md`` does for perplexity; the ``<bos>``/``<pad>`` columns stay and count as
impossible mass.

Rows (contexts) are ``<bos>`` (the start distribution) and the ``V`` words; ``<eos>`` is
absorbing and never trained on, so it is not a row.  Aggregation:

* ``js``: mean over rows, **uniform** weight per row (the MixCE paper's "average JS"), over
  the rows the chain can reach within ``max_length`` (a word that no row and not the start
  distribution leads to never occurs, so no objective can learn its row; this only happens
  for tiny vocabularies — the chance is about V·2^-(V+1) at 50% zeros);
* ``js_weighted``, ``fkl``, ``rkl``, ``rkl_support``, ``impossible_mass``: **per token**, i.e.
  rows weighted by how often the true chain predicts from them (:meth:`MarkovChain.visit_counts`
  with the dataset's ``max_length``; ``<bos>`` once per sequence).

Two ways to get q, for two kinds of models:

* :func:`exact_metrics` — a model whose next-token distribution depends only on the previous
  token (the bigram model): q is read once per row (:func:`context_free_table`) and the
  aggregates above are exact.
* :func:`contextual_metrics` — any causal LM (tiny GPT-2): q depends on the whole prefix, so
  the model is run on held-out sequences *sampled from the true chain* and every prediction
  position with context token c is compared with P(·|c).  The per-token quantities are then
  Monte-Carlo estimates of the same expectations (exact over the next token, sampled over
  contexts), and ``js`` is the uniform mean, over the rows that occur, of each row's mean JS.
  For a bigram model both give the same numbers up to sampling error (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .markov import MarkovChain

__all__ = [
    "REVERSE_KL_EPS",
    "context_free_table",
    "contextual_metrics",
    "evaluate_model",
    "exact_metrics",
    "mixce_fixed_point",
    "mixce_fixed_point_metrics",
    "model_position_distributions",
    "restrict_to_language",
    "row_divergences",
]

#: Floor on p in the clipped reverse KL.
REVERSE_KL_EPS = 1e-6

#: Names of the aggregate metrics, in table order.
METRIC_NAMES = ("js", "js_weighted", "fkl", "rkl", "rkl_support", "impossible_mass")


def _xlogy_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a·log(a/b) elementwise with 0·log(0/b) = 0 (b > 0 wherever a > 0)."""
    out = np.zeros_like(a)
    pos = a > 0
    out[pos] = a[pos] * (np.log(a[pos]) - np.log(b[pos]))
    return out


def row_divergences(p: np.ndarray, q: np.ndarray, eps: float = REVERSE_KL_EPS) -> dict[str, np.ndarray]:
    """Per-row divergences between true rows ``p`` and model rows ``q`` (both ``(n, K)``).

    Returns arrays of shape ``(n,)``: ``js``, ``fkl``, ``rkl``, ``rkl_support``,
    ``impossible_mass`` (definitions in the module docstring).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    m = 0.5 * (p + q)
    js = 0.5 * _xlogy_ratio(p, m).sum(-1) + 0.5 * _xlogy_ratio(q, m).sum(-1)
    if ((p > 0) & (q <= 0)).any():
        fkl = np.where(((p > 0) & (q <= 0)).any(-1), np.inf, 0.0)
        ok = ~np.isinf(fkl)
        fkl[ok] = _xlogy_ratio(p[ok], q[ok]).sum(-1)
    else:
        fkl = _xlogy_ratio(p, q).sum(-1)
    support = p > 0
    impossible = np.where(support, 0.0, q).sum(-1)
    rkl = _xlogy_ratio(q, np.maximum(p, eps)).sum(-1)
    q_on = np.where(support, q, 0.0)
    q_tilde = q_on / np.maximum(q_on.sum(-1, keepdims=True), 1e-300)
    rkl_support = _xlogy_ratio(q_tilde, np.where(support, p, 1.0)).sum(-1)
    return {"js": js, "fkl": fkl, "rkl": rkl, "rkl_support": rkl_support, "impossible_mass": impossible}


def restrict_to_language(q: np.ndarray | torch.Tensor, chain: MarkovChain) -> np.ndarray:
    """Model probabilities over the language's ``V + 3`` tokens (extra columns renormalised away)."""
    q = q.detach().double().cpu().numpy() if torch.is_tensor(q) else np.asarray(q, dtype=np.float64)
    k = chain.model_vocab_size
    if q.shape[-1] < k:
        raise ValueError(f"model distributions have {q.shape[-1]} tokens, the language needs {k}")
    if q.shape[-1] > k:
        q = q[..., :k]
        q = q / q.sum(-1, keepdims=True)
    return q


def exact_metrics(chain: MarkovChain, q_table: np.ndarray | torch.Tensor, max_length: int) -> dict[str, float]:
    """Exact metrics of a context-free model given its table ``q_table[c] = Q(· | c)``.

    ``q_table`` is indexed by context id (``(V+3, K)``, K ≥ V+3); only the rows
    :attr:`MarkovChain.row_ids` are read.  ``max_length`` is the dataset's, for the visit weights.
    """
    q = restrict_to_language(q_table, chain)
    visits = chain.visit_counts(max_length)
    rows = chain.row_ids[visits[chain.row_ids] > 0]  # unreachable words are not part of the language
    div = row_divergences(chain.next_token_table()[rows], q[rows])
    w = visits[rows] / visits[rows].sum()
    out = {"js": float(div["js"].mean()), "js_weighted": float((w * div["js"]).sum()), "rows": len(rows)}
    for name in ("fkl", "rkl", "rkl_support", "impossible_mass"):
        out[name] = float((w * div[name]).sum())
    return out


def contextual_metrics(chain: MarkovChain, contexts: np.ndarray, q: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics from model distributions at prediction positions of true sequences.

    ``contexts`` (n,) is the previous token of each position (``<bos>`` or a word), ``q``
    (n, K) the model's next-token distribution there.
    """
    contexts = np.asarray(contexts, dtype=np.int64)
    q = restrict_to_language(q, chain)
    if len(contexts) != len(q) or len(q) == 0:
        raise ValueError("need one model distribution per context, and at least one position")
    div = row_divergences(chain.next_token_table()[contexts], q)
    k = chain.model_vocab_size
    counts = np.bincount(contexts, minlength=k)
    js_per_row = np.bincount(contexts, weights=div["js"], minlength=k)
    seen = counts > 0
    out = {
        "js": float((js_per_row[seen] / counts[seen]).mean()),
        "js_weighted": float(div["js"].mean()),
        "rows": int(seen.sum()),
    }
    for name in ("fkl", "rkl", "rkl_support", "impossible_mass"):
        out[name] = float(div[name].mean())
    return out


# ---------------------------------------------------------------------- reading models
@torch.no_grad()
def context_free_table(model: torch.nn.Module, chain: MarkovChain) -> torch.Tensor:
    """``Q(· | c)`` for every single-token context c: one forward pass over ``[[c]]``.

    Exact for a model that only sees the previous token (the bigram model).
    """
    device = next(model.parameters()).device
    ids = torch.arange(chain.model_vocab_size, device=device)[:, None]
    logits = model(input_ids=ids).logits[:, -1].double()  # fp64: no underflow to exactly 0
    return torch.softmax(logits, -1).cpu()


@torch.no_grad()
def model_position_distributions(
    model: torch.nn.Module, chain: MarkovChain, sequences: Sequence[np.ndarray], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` on ``[<bos>] + seq`` and return ``(contexts, q)`` at every prediction position.

    Prediction positions are the ``<bos>`` and every token but the last (the last is ``<eos>``
    or the cut point, and has no target) — the same positions training predicts from.
    """
    device = next(model.parameters()).device
    all_ctx, all_q = [], []
    for begin in range(0, len(sequences), batch_size):
        batch = sequences[begin : begin + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), chain.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ctx = np.concatenate([[chain.bos_id], s[:-1]])
            ids[i, : len(ctx)] = torch.as_tensor(ctx)
            mask[i, : len(ctx)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        keep = mask.bool()
        all_ctx.append(ids[keep].numpy())
        all_q.append(torch.softmax(logits[keep.to(device)].double(), -1).cpu().numpy())
    return np.concatenate(all_ctx), np.concatenate(all_q)


def evaluate_model(
    model: torch.nn.Module,
    chain: MarkovChain,
    max_length: int,
    eval_sequences: Sequence[np.ndarray] | None = None,
    context_free: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` against ``chain``: exact for a context-free model, else on ``eval_sequences``."""
    was_training = model.training
    model.eval()
    try:
        if context_free:
            return exact_metrics(chain, context_free_table(model, chain), max_length)
        if not eval_sequences:
            raise ValueError("a contextual model needs eval_sequences sampled from the true chain")
        contexts, q = model_position_distributions(model, chain, eval_sequences)
        return contextual_metrics(chain, contexts, q)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- theory
def mixce_fixed_point(p: np.ndarray, eta: float, iters: int = 200) -> np.ndarray:
    """Where the project's (approximated) MixCE(η) drives a free distribution q, given data rows ``p``.

    The per-token loss is [η + (1−η)·sg(q_y)]·(−log q_y).  For a row whose logits are free (a
    full-rank bigram), the expected gradient w.r.t. logit k under y ~ p is
    Σ_y p_y w_y (q_k − [y = k]) with w_y = η + (1−η) q_y, so a stationary point satisfies

        q_k · Z = p_k · (η + (1−η) q_k),   Z = Σ_y p_y w_y
        ⇒  q_k = η p_k / (Z − (1−η) p_k)   on supp(p),  0 elsewhere,

    with Z the unique root of Σ_k q_k = 1 on Z > (1−η)·max p (the sum decreases from +∞ to 0
    there); found by bisection.  η = 1 gives q = p (MLE); η < 1 sharpens p (the ratio q_k/p_k
    grows with q_k); η = 0 is the limit q = one-hot on argmax p, since the loss is then
    −Σ_y p_y q_y.  So for η < 1 the objective's optimum is *not* P, and the JS between this fixed
    point and P is a floor that more data or training cannot remove.  ``p`` is ``(K,)`` or ``(n, K)``.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        return np.stack([mixce_fixed_point(row, eta, iters) for row in p])
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    q = np.zeros_like(p)
    if eta == 0.0:
        q[np.argmax(p)] = 1.0
        return q
    if eta == 1.0:
        return p / p.sum()
    s = p > 0
    ps = p[s]
    lo = (1.0 - eta) * ps.max()
    hi = lo + eta * len(ps) + 1.0  # there every term is < η p_k / (η·n) ≤ 1/n: the sum is < 1
    for _ in range(iters):
        z = 0.5 * (lo + hi)
        if (eta * ps / (z - (1.0 - eta) * ps)).sum() > 1.0:
            lo = z
        else:
            hi = z
    q[s] = eta * ps / (hi - (1.0 - eta) * ps)
    return q / q.sum()


def mixce_fixed_point_metrics(chain: MarkovChain, eta: float, max_length: int) -> dict[str, float]:
    """:func:`exact_metrics` of the MixCE(η) fixed point of every row of the true chain."""
    table = chain.next_token_table()
    rows = chain.row_ids
    fixed = np.zeros_like(table)
    fixed[rows] = mixce_fixed_point(table[rows], eta)
    return exact_metrics(chain, fixed, max_length)
