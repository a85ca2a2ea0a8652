"""Fused per-position softmax statistics: CE, entropy and EMO's transport cost in one pass.

For logits z_i (n×V), q_i = softmax(z_i), lse_i = logsumexp(z_i) and gold token y_i:

    CE_i = lse_i − z_i[y_i]                              ∂CE_i/∂z_k = q_k − 1[k = y_i]
    H_i  = −Σ_v q_v log q_v = lse_i − Σ_v q_v z_v        ∂H_i/∂z_k  = −q_k (log q_k + H_i)
    D_i  = Σ_v q_v (1 − ê_v·ê_{y_i})                     ∂D_i/∂z_k  = q_k (c_k − D_i),  c_k = 1 − ê_k·ê_{y_i}

(D is EMO's transport cost with a cosine cost; see ``emo.py``.)

Why a custom autograd Function: composing these from ``log_softmax``/``exp``/``matmul``
makes autograd keep several N×V tensors for backward (log-probabilities, probabilities,
a one-hot or the transport input) plus an fp32 copy of bf16 logits.  Here the forward
pass keeps only the logits it was given (the tensor the model already returned, in its
own dtype) and a few length-n vectors; the backward pass recomputes q = exp(z − lse) and
writes the gradient straight into one tensor of the logits' dtype, using the closed forms
above.  Both passes work on blocks of rows so their fp32 temporaries stay bounded
(``block_elements``, and about 1/``MIN_BLOCKS`` of large logits), whatever n is.  The math
runs in fp32 (float64 for float64 logits).

EMO's D is computed without cancellation: with q' = q with its gold entry set to 0,

    D_i = Σ_{v≠y} q_v − ê_y·(Êᵀ q') + q_y (1 − ê_y·ê_y)

so both terms that cancel are O(1 − q_y) rather than O(1): D keeps its relative precision
when q sits on the gold token, and the (n×V)(V×d_c) product tolerates low precision
(``transport_dtype``).  The last term is 0 for a unit row up to the rounding of its
normalisation (and q_y for an all-zero row, which the cosine cost gives a self-cost of 1).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import triton_stats

#: fp32 elements of one block of rows (so a temporary is at most 128 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 25
#: ... and at least this many blocks, so temporaries stay a fraction of the N×V logits ...
MIN_BLOCKS = 8
#: ... but no block below this many elements (small blocks only add per-op overhead).
MIN_BLOCK_ELEMENTS = 1 << 20

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "row_stats_cache", "self_costs", "softmax_stats"]


class _RowStatsCache(threading.local):
    mode: str | None = None  # None, "record" or "replay"
    items: list | None = None
    pos: int = 0


_cache = _RowStatsCache()


@contextmanager
def row_stats_cache(items: list, replay: bool = False):
    """Record (or replay) the per-row statistics of the :func:`softmax_stats` calls made inside.

    The chunked loss path records them while computing a chunk in its forward pass and replays
    them when it recomputes that chunk's logits in backward: the recompute then skips the
    statistics' forward pass (max, exp, sum and, for EMO, the transport product) and goes
    straight to the closed-form backward.  A call whose shape or kind does not match the next
    recorded one is computed normally.  Thread-local (CUDA backward runs on its own thread).
    """
    prev = (_cache.mode, _cache.items, _cache.pos)
    _cache.mode, _cache.items, _cache.pos = ("replay" if replay else "record"), items, 0
    try:
        yield
    finally:
        _cache.mode, _cache.items, _cache.pos = prev


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(n: int, vocab: int, block_elements: int):
    vocab = max(vocab, 1)
    rows = max(1, min(block_elements // vocab, max(-(-n // MIN_BLOCKS), MIN_BLOCK_ELEMENTS // vocab)))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def no_autocast(device: torch.device):
    """A context that turns an ambient autocast off on ``device`` (a no-op when none is on).

    The statistics (here, in the chunked path and in SequenceMatch) are fp32 math by design."""
    # The statistics are fp32 math by design: an ambient autocast must not turn the
    # transport product (or anything else) into bf16 behind our back.
    kind = device.type
    try:
        on = torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):  # device types without autocast support
        return nullcontext()
    return torch.autocast(kind, enabled=False) if on else nullcontext()


#: Floor of log-probabilities where they multiply a probability: far below any log q with q > 0
#: (fp32 exp underflows below about −104), so it changes nothing there, and a −∞ logit (q = 0)
#: gives 0·(finite) = 0 — also after scaling by a large incoming gradient (finfo.min would overflow).
LOG_FLOOR = -1e4


class _SoftmaxStats(torch.autograd.Function):
    """(CE, H, D_clamped, lse, z̄) of each row of ``logits``; H, D and z̄ only when asked for (else empty).

    lse = logsumexp(z) is differentiable too (∂lse/∂z_k = q_k: ``mle``'s z-loss and label
    smoothing), and so is z̄ = mean of the row's finite logits (∂z̄/∂z_k = 1[z_k > −∞]/|finite|:
    label smoothing's mean_v −log q_v = lse − z̄; its gradient goes into the same backward pass)."""

    @staticmethod
    def forward(ctx, logits, targets, cost, self_cost, want_entropy, block_elements, want_mean=False):
        with no_autocast(logits.device):
            return _SoftmaxStats._forward(ctx, logits, targets, cost, self_cost, want_entropy, block_elements, want_mean)

    @staticmethod
    def _forward(ctx, logits, targets, cost, self_cost, want_entropy, block_elements, want_mean=False):
        n, vocab = logits.shape
        ct = _compute_dtype(logits.dtype)
        want_demd = cost is not None
        key = (n, vocab, logits.dtype, bool(want_entropy), want_demd)
        ctx.mean = None
        if want_mean:  # one blocked pass of its own (forward only: its gradient joins the backward pass below)
            ctx.mean = _finite_mean(logits, block_elements, ct)
        if _cache.mode == "replay" and _cache.pos < len(_cache.items) and _cache.items[_cache.pos][0] == key:
            lse, ce, entropy, demd_raw = (t.clone() for t in _cache.items[_cache.pos][1:])
            _cache.pos += 1
            return _SoftmaxStats._finish(ctx, logits, targets, cost, self_cost, block_elements, lse, ce, entropy, demd_raw)
        if triton_stats.usable(logits):
            try:
                lse, ce, entropy, demd_raw = _forward_triton(logits, targets, cost, self_cost, want_entropy, block_elements)
            except Exception as e:  # a Triton that cannot build here: fall back once, with a warning
                if not triton_stats.give_up_after_first_failure(e):
                    raise
            else:
                if _cache.mode == "record":
                    _cache.items.append((key, lse, ce, entropy, demd_raw))
                return _SoftmaxStats._finish(ctx, logits, targets, cost, self_cost, block_elements, lse, ce, entropy, demd_raw)
        new = {"dtype": ct, "device": logits.device}
        lse, ce = torch.empty(n, **new), torch.empty(n, **new)
        entropy = torch.empty(n if want_entropy else 0, **new)
        demd_raw = torch.empty(n if want_demd else 0, **new)
        for sl in _blocks(n, vocab, block_elements):
            z = logits[sl]  # the model's dtype: each pass below reads it once and writes fp32
            y = targets[sl].unsqueeze(1)
            m = z.amax(-1, keepdim=True).to(ct)  # an all −inf row gives nan, as torch.log_softmax does
            t = torch.sub(z, m)  # z − max ≤ 0, in the compute dtype (the upcast is fused in)
            t_gold = t.gather(1, y).squeeze(1)
            q = t.exp() if want_entropy else t.exp_()
            s = q.sum(-1, keepdim=True)
            log_s = s.log().squeeze(1)
            lse[sl] = m.squeeze(1) + log_s
            ce[sl] = log_s - t_gold
            if want_entropy or want_demd:
                q.div_(s)
            if want_entropy:
                # H = log s − Σ q·t: every term ≥ 0, no cancellation; Σ q·t as a batched dot.
                # A −∞ logit (masked column) has q = 0: 0·log 0 = 0, so t is floored to a finite
                # value first (0·(−∞) would be nan).
                t.clamp_min_(LOG_FLOOR)
                entropy[sl] = log_s - torch.bmm(q.unsqueeze(1), t.unsqueeze(2)).reshape(-1)
            if want_demd:
                q_gold = q.gather(1, y).squeeze(1)
                q.scatter_(1, y, 0.0)
                e_y = cost[targets[sl]].to(ct)
                moved = (q.to(cost.dtype) @ cost).to(ct)  # Êᵀq' (b×d_c), in the cost's dtype
                demd_raw[sl] = q.sum(-1) - (moved * e_y).sum(-1) + q_gold * self_cost[targets[sl]]
            del t, q
        if _cache.mode == "record":
            _cache.items.append((key, lse, ce, entropy, demd_raw))
        return _SoftmaxStats._finish(ctx, logits, targets, cost, self_cost, block_elements, lse, ce, entropy, demd_raw)

    @staticmethod
    def _finish(ctx, logits, targets, cost, self_cost, block_elements, lse, ce, entropy, demd_raw):
        mean, count = ctx.mean if ctx.mean is not None else (lse.new_empty(0), lse.new_empty(0))
        ctx.mean = None
        ctx.save_for_backward(logits, targets, lse, entropy, demd_raw, count)
        ctx.cost, ctx.self_cost, ctx.block_elements = cost, self_cost, block_elements
        ctx.set_materialize_grads(False)
        # D ≥ 0 in exact arithmetic; rounding can leave about −1e-8 when q sits on y.  A
        # negative loss is a known EMO pitfall, so D is clamped (its gradient is 0 there).
        return ce, entropy, demd_raw.clamp_min(0.0), lse.clone(), mean

    @staticmethod
    def backward(ctx, g_ce, g_entropy, g_demd, g_lse=None, g_mean=None):
        grads = (g_ce, g_entropy, g_demd, g_lse, g_mean)
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return (None,) * 7
        device = next(g.device for g in grads if g is not None)
        with no_autocast(device):
            return _SoftmaxStats._backward(ctx, g_ce, g_entropy, g_demd, g_lse, g_mean) + (None,)

    @staticmethod
    def _backward(ctx, g_ce, g_entropy, g_demd, g_lse=None, g_mean=None):
        logits, targets, lse, entropy, demd_raw, count = ctx.saved_tensors
        # z̄'s gradient: g_mean/|finite| added at every finite column of the row
        g_col = None if g_mean is None or count.numel() == 0 else (g_mean.to(lse.dtype) / count)
        cost = ctx.cost
        n, vocab = logits.shape
        ct = lse.dtype
        if entropy.numel() == 0:
            g_entropy = None
        if demd_raw.numel() == 0:
            g_demd = None
        if g_demd is not None:
            g_demd = torch.where(demd_raw >= 0, g_demd, torch.zeros_like(g_demd))  # clamp_min's gradient
        if triton_stats.usable(logits):
            grad = _backward_triton(ctx, logits, targets, lse, entropy, demd_raw, g_ce, g_entropy, g_demd, g_lse, g_col)
            return grad, None, None, None, None, None
        grad = torch.empty_like(logits)
        for sl in _blocks(n, vocab, ctx.block_elements):
            y = targets[sl].unsqueeze(1)
            # ∂/∂z_k = q_k·w_k − g_ce·1[k = y], with
            #   w_k = g_ce + g_D·(1 − D − s_k) − g_H·(log q_k + H),   s_k = ê_k·ê_y.
            u = torch.sub(logits[sl], lse[sl].unsqueeze(1))  # log q, in the compute dtype
            gc = None if g_ce is None else g_ce[sl].to(ct).unsqueeze(1)
            gl = None if g_lse is None else g_lse[sl].to(ct).unsqueeze(1)  # ∂lse/∂z = q: adds to every q_k
            if g_entropy is None and g_demd is None and (gl is not None or g_col is not None):
                # CE, lse and/or z̄ (MLE's z-loss, label smoothing): q·(g_ce + g_lse) − g_ce·1[k = y] + z̄'s term
                q = u.exp_()
                coef = gl if gc is None else (gc if gl is None else gc + gl)
                if coef is not None:
                    q.mul_(coef)
                else:
                    q.zero_()
                if gc is not None:
                    q.scatter_add_(1, y, -gc)
                if g_col is not None:
                    q.add_(torch.where(logits[sl] > float("-inf"), g_col[sl].unsqueeze(1), 0.0))
                grad[sl] = q
                del u, q
                continue
            if g_entropy is None and g_demd is None:
                # CE only (MLE, MixCE, MiLe): g·(q − onehot), the product written in the logits' dtype.
                q = u.exp_()
                q.scatter_add_(1, y, torch.full_like(gc, -1.0))
                torch.mul(q, gc, out=grad[sl])
                del u, q
                continue
            a = torch.zeros_like(lse[sl]).unsqueeze(1) if gc is None else gc
            if gl is not None:
                a = a + gl
            w = None
            if g_entropy is not None:
                gh = g_entropy[sl].to(ct).unsqueeze(1)
                # −g_H·(log q + H); log q floored to a finite value so a −∞ logit (q = 0) gets
                # q·w = 0 rather than 0·∞ = nan
                w = torch.addcmul(-gh * entropy[sl].unsqueeze(1), u.clamp_min(LOG_FLOOR), -gh)
            if g_demd is not None:
                gd = g_demd[sl].to(ct).unsqueeze(1)
                a = a + gd * (1.0 - demd_raw[sl].unsqueeze(1))
                s = (cost[targets[sl]] @ cost.T).to(ct)  # (b×V) ê_y·ê_k: the backward's one product
                s.scatter_(1, y, (1.0 - ctx.self_cost[targets[sl]]).unsqueeze(1))  # ê_y·ê_y as in forward
                if w is None:
                    w = torch.addcmul(a, s, -gd, out=s)
                else:
                    w.add_(torch.addcmul(a, s, -gd, out=s))
                del s
            else:
                w.add_(a)
            q = u.exp_().mul_(w)
            if gc is not None:
                q.scatter_add_(1, y, -gc)
            if g_col is not None:
                q.add_(torch.where(logits[sl] > float("-inf"), g_col[sl].unsqueeze(1), 0.0))
            grad[sl] = q  # cast to the logits' dtype on copy
            del u, q, w
        return grad, None, None, None, None, None


def _finite_mean(logits: torch.Tensor, block_elements: int, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the finite logits, their count) per row, in blocks.  A −∞ logit is a masked column
    (not a possible token): left out.  An all −∞ row gives nan, as its cross-entropy does."""
    n, vocab = logits.shape
    total = torch.empty(n, dtype=ct, device=logits.device)
    count = torch.empty(n, dtype=ct, device=logits.device)
    for sl in _blocks(n, vocab, block_elements):
        z = logits[sl]
        keep = z > float("-inf")
        total[sl] = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1, dtype=ct)
        count[sl] = keep.sum(-1).to(ct)
    return total / count, count


#: Products with the vocabulary as a GEMM dimension are padded to a multiple of this: an odd V
#: (GPT-2's 50257) sends cuBLAS to slow fallback kernels (~6× for the head product on an H100).
GEMM_ALIGN = 64


def pad_rows(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` in ``dtype`` with zero rows appended up to a multiple of ``GEMM_ALIGN`` (just cast when aligned)."""
    dtype = dtype or t.dtype
    rows = -(-t.shape[0] // GEMM_ALIGN) * GEMM_ALIGN
    if rows == t.shape[0]:
        return t.to(dtype)
    out = t.new_zeros((rows, *t.shape[1:]), dtype=dtype)
    out[: t.shape[0]].copy_(t)
    return out


_padded_costs = WeakIdKeyDictionary()  # cost tensor (by identity) → (its version, padded copy)


def _padded_cost(cost: torch.Tensor) -> torch.Tensor:
    """EMO's Ê padded by :func:`pad_rows` for the kernel path's two transport products, cached per cost tensor."""
    hit = _padded_costs.get(cost)
    if hit is None or hit[0] != cost._version:
        hit = _padded_costs[cost] = (cost._version, pad_rows(cost))
    return hit[1]


def _forward_triton(logits, targets, cost, self_cost, want_entropy, block_elements):
    """``_SoftmaxStats`` forward with the Triton kernels (one read of the logits; EMO: two)."""
    n, vocab = logits.shape
    if cost is None:  # no temporaries at all: every row in one launch
        lse, ce, entropy, _, _ = triton_stats.row_stats(logits, targets, want_entropy)
        return lse, ce, entropy, lse.new_empty(0)
    lse, ce = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)
    entropy = logits.new_empty(n if want_entropy else 0, dtype=torch.float32)
    demd_raw = logits.new_empty(n, dtype=torch.float32)
    cost_pad = _padded_cost(cost)
    for sl in _blocks(n, vocab, block_elements):  # q' (rows×V) is the one temporary: bounded by the blocks
        y = targets[sl]
        q = torch.empty((sl.stop - sl.start, cost_pad.shape[0]), dtype=cost.dtype, device=logits.device)
        q[:, vocab:].zero_()  # the padding columns meet Ê's zero rows
        lse[sl], ce[sl], ent, q_sum, q_gold = triton_stats.row_stats(logits[sl], y, want_entropy, q_out=q[:, :vocab])
        if want_entropy:
            entropy[sl] = ent
        moved = (q @ cost_pad).float()  # Êᵀq' (rows×d_c), in the cost's dtype, fp32 accumulation
        demd_raw[sl] = q_sum - (moved * cost[y].float()).sum(-1) + q_gold * self_cost[y]
        del q, moved
    return lse, ce, entropy, demd_raw


def _backward_triton(ctx, logits, targets, lse, entropy, demd_raw, g_ce, g_entropy, g_demd, g_lse=None, g_col=None):
    """``_SoftmaxStats`` backward with the Triton kernel: one read of the logits, one write of the gradient."""
    n, vocab = logits.shape
    f32 = torch.float32
    grad = torch.empty_like(logits)
    gce = None if g_ce is None else g_ce.to(f32).contiguous()
    gh = None if g_entropy is None else g_entropy.to(f32).contiguous()
    gl = None if g_lse is None else g_lse.to(f32)
    if g_demd is None:  # CE and/or entropy (and/or lse): no temporaries, one launch
        a = None
        if gh is not None or gl is not None:
            a = gce if gce is not None else torch.zeros_like(lse)
            if gl is not None:
                a = a + gl
        return triton_stats.row_grad(logits, targets, lse, grad, g_ce=gce, a=a, g_h=gh,
                                     entropy=entropy if gh is not None else None, g_m=g_col)
    cost = ctx.cost
    gd = g_demd.to(f32)
    a = (gce if gce is not None else torch.zeros_like(lse)) + gd * (1.0 - demd_raw)
    if gl is not None:
        a = a + gl
    s_gold = 1.0 - ctx.self_cost[targets]  # ê_y·ê_y, as the forward pass used it
    cost_pad = _padded_cost(cost)
    for sl in _blocks(n, vocab, ctx.block_elements):  # s (rows×V) is the one temporary
        y = targets[sl]
        s = cost[y] @ cost_pad.T  # ê_y·ê_k, in the cost's dtype: the backward's one product (aligned rows)
        triton_stats.row_grad(
            logits[sl], y, lse[sl], grad[sl], g_ce=None if gce is None else gce[sl], a=a[sl], g_d=gd[sl],
            s=s[:, :vocab], s_gold=s_gold[sl], g_h=None if gh is None else gh[sl], entropy=None if gh is None else entropy[sl],
            g_m=None if g_col is None else g_col[sl],
        )
        del s
    return grad


def self_costs(cost: torch.Tensor) -> torch.Tensor:
    """1 − ê_v·ê_v per row of Ê (float64 arithmetic): 0 up to the rounding of the
    normalisation for a unit row, 1 for an all-zero row (which the cosine cost gives a
    self-cost of 1)."""
    c = 1.0 - cost.double().pow(2).sum(-1)
    return c.to(_compute_dtype(cost.dtype))


def softmax_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy: bool = False,
    cost: torch.Tensor | None = None,
    self_cost: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    lse: bool = False,
    logit_mean: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row ``ce`` (and ``entropy``, ``demd``, ``lse``, ``logit_mean``) of ``logits`` (n, V) for ``targets`` (n,).

    Args:
        logits: (n, V) in any float dtype; the math runs in fp32 (float64 stays float64),
            and the gradient comes back in the logits' dtype.
        targets: (n,) valid class ids (ignored positions carry any valid id).
        entropy: also return H_i (differentiable; MiLe detaches it).
        cost: the row-normalised cost embedding Ê (V, d_c) for EMO's ``demd``; no gradient
            flows into it.  Its dtype is the dtype of the two (n×V)(V×d_c) products (fp32,
            or bf16 for speed: see ``EmoObjective(transport_dtype=...)``); the rest of the
            math stays in the compute dtype.
        self_cost: (V,) 1 − ê_v·ê_v (:func:`self_costs`: ≈ 0 for a normalised row, 1 for an
            all-zero row); computed from ``cost`` when omitted.
        block_elements: rows are processed in blocks of at most this many elements (and in at
            least ``MIN_BLOCKS`` blocks when the logits are larger than ``MIN_BLOCK_ELEMENTS`` of them).
        lse: also return ``lse`` = logsumexp(z_i), differentiable (∂/∂z_k = q_k), from the same pass.
        logit_mean: also return ``logit_mean`` = mean of the finite logits of each row (label
            smoothing), differentiable; one more read of the logits forward, none backward.
    """
    if logits.dim() != 2:
        raise ValueError(f"softmax_stats expects (n, V) logits, got shape {tuple(logits.shape)}")
    ct = _compute_dtype(logits.dtype)
    if cost is not None:
        if cost.dtype == torch.float64 and ct != torch.float64:
            cost = cost.to(ct)
        if self_cost is None:
            self_cost = self_costs(cost)
        self_cost = self_cost.to(ct)
    ce, ent, demd, lse_out, mean = _SoftmaxStats.apply(
        logits, targets, cost, self_cost, bool(entropy), int(block_elements), bool(logit_mean)
    )
    out = {"ce": ce}
    if lse:
        out["lse"] = lse_out
    if logit_mean:
        out["logit_mean"] = mean
    if entropy:
        out["entropy"] = ent
    if cost is not None:
        out["demd"] = demd
    return out

