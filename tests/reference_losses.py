"""Float64 reference losses written from the spec formulas (docs/objectives.md), plus test helpers.

Independent of ``emo_trainer.objectives``: the references shift by slicing (the
production code pads the labels), compute log-probabilities by hand, and EMO builds the
full V×V cosine cost matrix and a dense one-hot target instead of the production gather +
one matmul.  Gradients of the references come from autograd through these formulas.
"""

from __future__ import annotations

import torch

IGNORE = -100


# ---------------------------------------------------------------------- references
def _flat_shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Float64 (n, V) logits of positions 0..T-2 and their targets labels[1..T-1]."""
    z = logits[..., :-1, :].to(torch.float64)
    y = labels[..., 1:]
    z = z.reshape(-1, z.shape[-1])
    y = y.reshape(-1)
    valid = y != IGNORE
    return z[valid], y[valid], int(valid.sum())


def _log_probs(z: torch.Tensor) -> torch.Tensor:
    m = z.max(dim=-1, keepdim=True).values.detach()
    return z - (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True)))


def _reduce(per_token: torch.Tensor, n_valid: int, num_items) -> torch.Tensor:
    denom = n_valid if num_items is None else num_items
    return per_token.sum() / max(float(denom), 1.0)


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -_log_probs(z)[torch.arange(len(y)), y]


def mle_ref(logits, labels, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    return _reduce(_ce(z, y), n, num_items)


def emo_cost_matrix(cost_embedding: torch.Tensor) -> torch.Tensor:
    """C = 1 − Ê Êᵀ (V×V) with Ê the row-normalised embedding, float64."""
    e = cost_embedding.to(torch.float64)
    e_hat = e / e.norm(dim=-1, keepdim=True)
    return 1.0 - e_hat @ e_hat.T


def emo_demd_ref(z: torch.Tensor, y: torch.Tensor, cost_embedding: torch.Tensor) -> torch.Tensor:
    """D_i = Σ_v Σ_j q_i[v]·1[j = y_i]·C_vj with the full cost matrix and a dense one-hot."""
    cost = emo_cost_matrix(cost_embedding)
    q = torch.exp(_log_probs(z))
    one_hot = torch.zeros_like(q)
    one_hot[torch.arange(len(y)), y] = 1.0
    return ((q @ cost) * one_hot).sum(-1)


def emo_ref(logits, labels, cost_embedding, mode=1, ratio_cap=3.0, eps=1e-6, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    d = emo_demd_ref(z, y, cost_embedding)
    if mode == 1:
        w = (ce / (d + eps)).detach()
        if ratio_cap is not None:
            w = torch.minimum(w, torch.full_like(w, ratio_cap))
        per_token = 0.5 * (ce + w * d)
    else:
        per_token = (d / (ce + eps)).detach() * ce + d
    return _reduce(per_token, n, num_items)


def mixce_ref(logits, labels, eta=0.1, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    q_gold = torch.exp(-ce).detach()
    return _reduce((eta + (1 - eta) * q_gold) * ce, n, num_items)


def mile_weights_ref(logits, labels, gamma=1.0):
    """w_i = (1 + H(sg q_i))^γ of the valid positions, float64."""
    z, _, _ = _flat_shifted(logits, labels)
    logp = _log_probs(z.detach())
    entropy = -(torch.exp(logp) * logp).sum(-1)
    return (1.0 + entropy) ** gamma


def mile_ref(logits, labels, gamma=1.0, num_items=None, alpha=None):
    """MiLe: α·Σ w_i CE_i / num_items; α = n_valid/Σ w_i of this batch unless given."""
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    w = mile_weights_ref(logits, labels, gamma)
    if alpha is None:
        alpha = n / float(w.sum()) if n else 0.0
    return _reduce(alpha * w * ce, n, num_items)


# ---------------------------------------------------------------------- helpers
def make_batch(batch: int, length: int, vocab: int, seed: int = 0, scale: float = 3.0):
    """Random logits (B, T, V) float64 and labels with padding (−100) and unequal valid counts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for b in range(batch):
        labels[b, length - b :] = IGNORE  # right padding: row b loses b positions
    labels[0, 1] = IGNORE  # an ignored position in the middle too
    return logits, labels


def num_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE).sum())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (norm-wise, so near-zero entries do not blow it up)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def objective_loss(objective, logits, labels, num_items=None):
    """The objective's loss; float64 logits stay float64 (the public ``__call__`` runs fp32).

    Float64 goes through the same ``token_stats``/``finish`` as ``__call__``, without its
    fp32 upcast, so the formula itself can be checked to 1e-6.
    """
    if logits.dtype != torch.float64:
        return objective(logits, labels, num_items).loss
    from emo_trainer.objectives import IGNORE_INDEX, shift_labels

    targets = shift_labels(labels).reshape(-1)
    valid = targets != IGNORE_INDEX
    stats = objective.token_stats(logits.reshape(-1, logits.shape[-1]), targets.masked_fill(~valid, 0), {})
    return objective.finish(stats, valid, num_items).loss


def value_and_grad(fn, logits: torch.Tensor):
    """(loss, d loss / d logits) of ``fn(leaf)`` for a fresh leaf copy of ``logits``."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 1e-2}


def check_against_reference(objective, reference, logits64, labels, dtype, num_items=None):
    """Assert loss and logits-gradient of ``objective`` match ``reference`` (float64) in ``dtype``.

    The reference is evaluated at the same (rounded) input values, so the error measured is
    the objective's own arithmetic (fp32 loss math, gradient rounded to ``dtype``), not the
    rounding of the inputs.
    """
    logits = logits64.to(dtype)
    loss, grad = value_and_grad(lambda z: objective_loss(objective, z, labels, num_items), logits)
    ref_loss, ref_grad = value_and_grad(lambda z: reference(z, labels, num_items=num_items), logits.double())
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
    tol = TOLERANCE[dtype]
    assert rel_err(loss, ref_loss) < tol, (float(loss), float(ref_loss))
    assert rel_err(grad, ref_grad) < tol, rel_err(grad, ref_grad)


def grad_accumulation_check(objective, logits64, labels, atol=1e-5):
    """One batch vs its rows as micro-batches (num_items = all valid targets): loss and grads.

    Returns ``(big_loss, summed_micro_loss, big_grad, summed_micro_grad)`` after asserting
    nothing — MiLe's γ ≠ 0 is not exactly equivalent, so callers decide.
    """
    logits = logits64.float()
    n_items = num_targets(labels)
    big, big_grad = value_and_grad(lambda z: objective(z, labels, n_items).loss, logits)
    micro_loss, micro_grad = torch.zeros(()), torch.zeros_like(logits)
    for b in range(labels.shape[0]):
        loss, grad = value_and_grad(lambda z, b=b: objective(z, labels[b : b + 1], n_items).loss, logits[b : b + 1])
        micro_loss += loss
        micro_grad[b : b + 1] = grad
    return big, micro_loss, big_grad, micro_grad


def chunked_vs_full(objective, vocab: int, tied: bool, with_bias: bool, chunk_size: int = 3, seed: int = 0):
    """Loss and grads (hidden source, weight, bias) from full logits vs the chunked path, fp32."""
    from emo_trainer.objectives import chunked_objective_loss

    g = torch.Generator().manual_seed(seed)
    batch, length, dim = 3, 6, 8
    _, labels = make_batch(batch, length, vocab, seed=seed)
    weight0 = torch.randn(vocab, dim, generator=g) * 0.5
    bias0 = torch.randn(vocab, generator=g) * 0.5 if with_bias else None
    proj0 = torch.randn(dim, dim, generator=g) * 0.5
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    x0 = torch.randn(batch, length, dim, generator=g)
    n_items = num_targets(labels)

    def run(chunked: bool):
        weight = weight0.clone().requires_grad_(True)
        bias = bias0.clone().requires_grad_(True) if with_bias else None
        proj = proj0.clone().requires_grad_(True)
        # Tied: the lm_head weight is also the input embedding, so it gets two gradients.
        inputs = weight[ids] if tied else x0
        hidden = torch.tanh(inputs @ proj)
        if chunked:
            out = chunked_objective_loss(objective, hidden, weight, labels, n_items, bias=bias, chunk_size=chunk_size)
        else:
            logits = hidden @ weight.T + (bias if with_bias else 0.0)
            out = objective(logits, labels, n_items)
        params = [weight, proj] + ([bias] if with_bias else [])
        grads = torch.autograd.grad(out.loss, params)
        return out, grads

    return run(False), run(True)


def assert_chunked_matches(objective, vocab, tied, with_bias, tol=1e-5):
    (full, full_grads), (chunk, chunk_grads) = chunked_vs_full(objective, vocab, tied, with_bias)
    full_loss, chunk_loss = float(full.loss.detach()), float(chunk.loss.detach())
    assert abs(full_loss - chunk_loss) <= tol * max(1.0, abs(full_loss))
    for a, b in zip(full_grads, chunk_grads):
        assert rel_err(b, a) < tol
    for key, value in full.metrics.items():
        assert abs(value - chunk.metrics[key]) <= tol * max(1.0, abs(value)), key


def assert_empty_batch_is_zero(objective, vocab=11):
    """No valid target: a differentiable zero loss with a finite (zero) gradient."""
    logits = torch.randn(2, 5, vocab, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    for num_items in (None, 7):
        out = objective(logits, labels, num_items)
        assert out.loss.requires_grad and float(out.loss.detach()) == 0.0 and out.num_valid == 0
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(grad).all() and float(grad.abs().max()) == 0.0
        assert all(torch.isfinite(torch.tensor(v)) for v in out.metrics.values())


def assert_bf16_model_finite(objective, seed: int = 0):
    """A tiny bf16 GPT-2 (built from a config, no network): finite loss and finite gradients."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    objective.setup(model)
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[1, 8:] = IGNORE
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    out = objective(logits, labels, num_targets(labels))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
    return model


# ---------------------------------------------------------------------- ecosystem objectives (issue 17)
# Float64, from objectives.md §6; q_y = sg(exp(−CE)); −∞ columns allowed (masked vocabulary).
def dft_ref(logits, labels, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    return _reduce(torch.exp(-ce).detach() * ce, n, num_items)


def tailr_ref(logits, labels, gamma=1e-7, min_weight=0.2, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    q = torch.exp(-ce).detach()
    w = torch.clamp(q / (gamma + (1.0 - gamma) * q), min_weight, 1.0)
    return _reduce(w * ce, n, num_items)


def focal_weights_ref(logits, labels, gamma=1.0):
    """w_i = (1 − q_y)^γ of the valid positions, float64."""
    z, y, _ = _flat_shifted(logits, labels)
    q = torch.exp(-_ce(z.detach(), y))
    return (1.0 - q) ** gamma


def focal_ref(logits, labels, gamma=1.0, num_items=None, alpha=None):
    """Focal: α·Σ w_i CE_i / num_items; α = n_valid/Σ w_i of this batch unless given."""
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    w = focal_weights_ref(logits, labels, gamma)
    if alpha is None:
        alpha = n / float(w.sum()) if n else 0.0
    return _reduce(alpha * w * ce, n, num_items)


def topk_entropy_ref(z: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the softmax over the k largest logits (full descending sort), float64, no grad."""
    top = z.detach().to(torch.float64).sort(dim=-1, descending=True).values[:, : min(k, z.shape[-1])]
    logp = _log_probs(top)
    p = torch.exp(logp)
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def eaft_ref(logits, labels, alpha=1.0, top_k=20, normalizer=3.0, num_items=None):
    z, y, n = _flat_shifted(logits, labels)
    ce = _ce(z, y)
    w = (topk_entropy_ref(z, top_k) / normalizer) ** alpha
    return _reduce(w * ce, n, num_items)


def mle_options_ref(logits, labels, label_smoothing=0.0, z_loss=0.0, num_items=None):
    """(1−ε)·CE + ε·mean over finite columns of −log q + β·lse², float64."""
    z, y, n = _flat_shifted(logits, labels)
    logp = _log_probs(z)
    ce = -logp[torch.arange(len(y)), y]
    finite = torch.isfinite(z)
    smooth = -torch.where(finite, logp, torch.zeros_like(logp)).sum(-1) / finite.sum(-1)
    m = z.max(dim=-1).values.detach()
    lse = m + torch.log(torch.exp(z - m[:, None]).sum(-1))
    per_token = (1.0 - label_smoothing) * ce + label_smoothing * smooth + z_loss * lse**2
    return _reduce(per_token, n, num_items)


def with_masked_columns(logits: torch.Tensor, labels: torch.Tensor, columns=(1, 4)) -> torch.Tensor:
    """``logits`` with −∞ in ``columns`` wherever that column is not the position's target."""
    out = logits.clone()
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    for c in columns:
        out[..., c] = torch.where(targets == c, out[..., c], torch.full_like(out[..., c], float("-inf")))
    return out
