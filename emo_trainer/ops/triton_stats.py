"""Triton kernels behind ``fused.softmax_stats`` on GPUs: each statistic in one pass over a row.

The formulas are those of ``fused.py`` (q = softmax(z), gold token y, lse = logsumexp(z)):

    CE   = log s − (z_y − m)                      m = max z,  s = Σ_v exp(z_v − m)
    H    = log s − Σ_v exp(z_v − m)(z_v − m) / s  (every term ≥ 0: no cancellation)
    q'_v = exp(z_v − m)/s for v ≠ y, 0 at y       (EMO's transport input, written in the product's dtype)

    ∂/∂z_k = q_k·w_k − g_CE·1[k = y] (+ g_z̄/|finite|·1[z_k > −∞]),
    w_k = a − g_D·s_k − g_H·(log q_k + H),   a = g_CE + g_D·(1 − D) (+ g_lse)

(lse and z̄, the mean of the finite logits, are ``mle``'s z-loss and label-smoothing statistics.)

Forward, one program per row (``_row_stats_kernel``): an online max / sum-exp (and Σ e·t for the
entropy) over blocks of the row — the logits are read once, in their own dtype, and upcast in
registers; for EMO a second sweep writes q' (and Σ_{v≠y} q_v, q_y).  Backward
(``_row_grad_kernel``): one sweep that reads z (and EMO's s_k = ê_y·ê_k) and writes the gradient
once, in the logits' dtype.  What the PyTorch code in ``fused.py`` does in 5–8 passes with fp32
temporaries, these do in one or two with none: on an H100 that is the difference between the
statistics costing more than the built-in cross-entropy and costing less.

Used when the logits are on a CUDA device and Triton is importable; ``EMO_TRAINER_TRITON=0``
turns it off (the PyTorch code then runs, with the same results up to fp32 rounding).  The tests
run these kernels on CPU with Triton's interpreter (``TRITON_INTERPRET=1`` and
``EMO_TRAINER_TRITON=interpret``), against the PyTorch code and float64 references.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

try:  # Triton is optional: it ships with CUDA builds of PyTorch, not with CPU ones.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  pragma: no cover - not installed, or a broken install: use the PyTorch code
    triton = None
    tl = None

__all__ = ["give_up_after_first_failure", "row_grad", "row_stats", "usable"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state = {"worked": False, "disabled": False}  # per process: a kernel ran / the kernels failed to build


def usable(logits: torch.Tensor) -> bool:
    """Whether the Triton kernels handle ``logits`` (CUDA, fp32/bf16/fp16, Triton installed and working)."""
    if triton is None or _state["disabled"] or logits.dtype not in _DTYPES or logits.dim() != 2:
        return False
    mode = os.environ.get("EMO_TRAINER_TRITON", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    if logits.is_cuda:
        return True
    return mode == "interpret" and os.environ.get("TRITON_INTERPRET") == "1" and logits.device.type == "cpu"


# ------------------------------------------------------------------ kernels (plain functions;
# jitted lazily by _kernels(), so that TRITON_INTERPRET set by a test takes effect)
def _row_stats_kernel(
    Z, stride_z, Y, LSE, CE, ENT, Q, stride_q, QSUM, QGOLD, V: tl.constexpr,
    WANT_ENT: tl.constexpr, WANT_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(Y + row).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.full((), 0.0, tl.float32)  # Σ exp(z − m)
    a = tl.full((), 0.0, tl.float32)  # Σ exp(z − m)(z − m) ≤ 0
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all −inf prefix: nothing to rescale
        scale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if WANT_ENT:
            t = tl.where(e > 0.0, z - shift, 0.0)
            a = scale * (a + tl.where(s > 0.0, m - shift, 0.0) * s) + tl.sum(e * t, 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    z_y = tl.load(z_row + y).to(tl.float32)
    tl.store(LSE + row, m + log_s)
    tl.store(CE + row, log_s - (z_y - m))
    if WANT_ENT:
        tl.store(ENT + row, log_s - a / s)
    if WANT_Q:
        q_row = Q + row * stride_q
        q_sum = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            q = tl.where(cols == y, 0.0, tl.exp(z - m) / s)
            tl.store(q_row + cols, q.to(Q.dtype.element_ty), mask=mask)
            q_sum += tl.sum(tl.where(mask, q, 0.0), 0)
        tl.store(QSUM + row, q_sum)
        tl.store(QGOLD + row, tl.exp(z_y - m) / s)


def _row_grad_kernel(
    Z, stride_z, Y, LSE, GCE, A, GD, GH, ENT, S, stride_s, SGOLD, G, stride_g, GM, V: tl.constexpr,
    HAS_CE: tl.constexpr, HAS_D: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr, HAS_A: tl.constexpr,
    HAS_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    g_row = G + row * stride_g
    y = tl.load(Y + row).to(tl.int64)
    lse = tl.load(LSE + row)
    offs = tl.arange(0, BLOCK)
    gce = tl.load(GCE + row) if HAS_CE else 0.0
    if HAS_D or HAS_H or HAS_A:  # HAS_A alone: a = g_CE + g_lse (MLE's z-loss / label smoothing)
        a = tl.load(A + row)
    else:
        a = gce
    if HAS_D:
        gd = tl.load(GD + row)
        s_gold = tl.load(SGOLD + row)
    if HAS_H:
        gh = tl.load(GH + row)
        h = tl.load(ENT + row)
    if HAS_M:
        gm = tl.load(GM + row)  # g_z̄ / |finite|: label smoothing's mean over the finite logits
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        gold = cols == y
        zf = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = zf - lse  # log q
        w = tl.zeros((BLOCK,), tl.float32) + a
        if HAS_D:
            sk = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            w = w - gd * tl.where(gold, s_gold, sk)
        if HAS_H:
            w = w - gh * (u + h)
        q = tl.exp(u)
        g = tl.where(q > 0.0, q * w, 0.0)  # a −inf logit (q = 0) gets 0, not 0·∞
        if HAS_CE:
            g = g - tl.where(gold, gce, 0.0)
        if HAS_M:
            g = g + tl.where(zf > float("-inf"), gm, 0.0)
        tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)


def give_up_after_first_failure(error: BaseException) -> bool:
    """Called with an exception raised by the kernels.  If they have never run in this process
    (a Triton that cannot build for this GPU or driver), turn them off with one warning and return
    True: the caller then uses the PyTorch code.  Otherwise (they worked before; out of memory)
    return False: the caller re-raises."""
    if _state["worked"] or isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    _state["disabled"] = True
    logger.warning("Triton kernels for the loss statistics failed (%s: %s); using the PyTorch code instead "
                   "(same results, slower on GPUs). Set EMO_TRAINER_TRITON=0 to silence this.",
                   type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    return True


_JITTED: dict[bool, dict] = {}


def _on(device: torch.device):
    """Launch on the tensors' GPU even when another one is current (Triton uses the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernels() -> dict:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _JITTED:
        _JITTED[interpret] = {"stats": triton.jit(_row_stats_kernel), "grad": triton.jit(_row_grad_kernel)}
    return _JITTED[interpret]


def _launch_config(vocab: int, interpret: bool) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(vocab))
    if interpret:
        block = min(block, 128)  # the interpreter runs a program's block with numpy: keep tests quick
    return block, (8 if block >= 2048 else 4)


def row_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    want_entropy: bool,
    q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row (lse, ce, entropy, q_sum, q_gold) of ``logits`` (n, V) in fp32.

    ``entropy`` is empty unless ``want_entropy``; with ``q_out`` (n, V, any float dtype) the
    kernel also writes q' (softmax with the gold entry zeroed) into it and returns
    q_sum = Σ_{v≠y} q_v and q_gold = q_y (else both are empty).
    """
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()  # the kernels index the 1-D vectors densely
    f32 = {"dtype": torch.float32, "device": logits.device}
    lse, ce = torch.empty(n, **f32), torch.empty(n, **f32)
    ent = torch.empty(n if want_entropy else 1, **f32)
    want_q = q_out is not None
    q_sum, q_gold = torch.empty(n if want_q else 1, **f32), torch.empty(n if want_q else 1, **f32)
    q = q_out if want_q else lse  # a placeholder pointer when unused
    if n == 0:
        return lse, ce, ent[:0], q_sum[:0], q_gold[:0]
    block, warps = _launch_config(vocab, os.environ.get("TRITON_INTERPRET") == "1")
    with _on(logits.device):
        _kernels()["stats"][(n,)](
            logits, logits.stride(0), targets, lse, ce, ent, q, q.stride(0) if want_q else 0, q_sum, q_gold, vocab,
            WANT_ENT=bool(want_entropy), WANT_Q=want_q, BLOCK=block, num_warps=warps,
        )
    _state["worked"] = True
    return lse, ce, ent if want_entropy else ent[:0], q_sum if want_q else q_sum[:0], q_gold if want_q else q_gold[:0]


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    g_ce: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    g_d: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    s_gold: torch.Tensor | None = None,
    g_h: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    g_m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ∂/∂z of the statistics into ``out`` (n, V, the logits' dtype); see the module docstring.

    All per-row vectors are fp32 (n,): ``g_ce`` (None: no CE term), ``a`` = g_CE + g_D·(1 − D)
    (+ g_lse, the gradient of logsumexp; needed with ``g_d`` or ``g_h``, and alone it adds g_lse·q), ``g_d`` with ``s`` (n, V: ê_y·ê_k) and ``s_gold``
    (the value used at the gold column), ``g_h`` with ``entropy``, ``g_m`` (added at every finite
    column: the gradient of the mean of the finite logits, already divided by their count).
    """
    n, vocab = logits.shape
    if n == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if out.stride(1) != 1 or (s is not None and s.stride(1) != 1):
        raise ValueError("row_grad: `out` and `s` need unit stride along the vocabulary")
    targets, lse = targets.contiguous(), lse.contiguous()
    g_ce, a, g_d, s_gold, g_h, entropy, g_m = (None if t is None else t.contiguous()
                                               for t in (g_ce, a, g_d, s_gold, g_h, entropy, g_m))
    has_d, has_h = g_d is not None, g_h is not None
    if (has_d or has_h) and a is None:
        raise ValueError("row_grad: `a` is required with g_d or g_h")
    dummy = lse
    block, warps = _launch_config(vocab, os.environ.get("TRITON_INTERPRET") == "1")
    with _on(logits.device):
        _kernels()["grad"][(n,)](
            logits, logits.stride(0), targets, lse,
            dummy if g_ce is None else g_ce, dummy if a is None else a,
            dummy if g_d is None else g_d, dummy if g_h is None else g_h, dummy if entropy is None else entropy,
            dummy if s is None else s, s.stride(0) if has_d else 0, dummy if s_gold is None else s_gold,
            out, out.stride(0), dummy if g_m is None else g_m, vocab,
            HAS_CE=g_ce is not None, HAS_D=has_d, HAS_H=has_h, BLOCK=block, HAS_A=a is not None, HAS_M=g_m is not None,
            num_warps=warps,
        )
    _state["worked"] = True
    return out
