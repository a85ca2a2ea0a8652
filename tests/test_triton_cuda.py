"""The Triton kernels compiled for a real GPU (skipped without CUDA; CPU CI runs test_triton_stats.py).

Run on a GPU machine with the interpreter off:  TRITON_INTERPRET=0 python -m pytest tests/test_triton_cuda.py
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs CUDA and TRITON_INTERPRET=0", allow_module_level=True)
pytest.importorskip("triton")

from emo_trainer.ops import triton_stats
from emo_trainer.ops.fused import softmax_stats


def _reference(z64, y, e_hat64):
    logp = torch.log_softmax(z64, -1)
    q = logp.exp()
    moved = q @ e_hat64  # Êᵀq: D = Σ_v q_v (1 − ê_v·ê_y) for unit rows
    return {"ce": -logp.gather(1, y[:, None]).squeeze(1), "entropy": -(q * logp).sum(-1),
            "demd": 1.0 - (moved * e_hat64[y]).sum(-1)}


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("vocab", [50257, 128256, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
def test_kernels_on_cuda_against_float64(vocab, dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 300
    z64 = torch.randn(n, vocab, device="cuda", dtype=torch.float64, generator=g) * 4
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    e_hat = torch.nn.functional.normalize(torch.randn(vocab, 64, device="cuda", dtype=torch.float64, generator=g), dim=-1)
    z = z64.to(dtype).requires_grad_(True)
    assert triton_stats.usable(z)
    got = softmax_stats(z, y, entropy=True, cost=e_hat.to(dtype if dtype != torch.float32 else torch.float32),
                        block_elements=64 * vocab)
    z_ref = z.detach().double().requires_grad_(True)
    ref = _reference(z_ref, y, e_hat)
    for k in ("ce", "entropy", "demd"):
        assert _rel(got[k].detach(), ref[k].detach()) < max(tol, 1e-5), k
    w = {k: torch.randn(n, device="cuda", dtype=torch.float64, generator=g) for k in ref}
    (grad,) = torch.autograd.grad(sum((got[k] * w[k].float()).sum() for k in ref), z)
    (grad_ref,) = torch.autograd.grad(sum((ref[k] * w[k]).sum() for k in ref), z_ref)
    assert grad.dtype == dtype and _rel(grad, grad_ref) < tol


@pytest.mark.parametrize("objective", ["mle", "mixce", "mile", "emo"])
def test_kernels_match_the_pytorch_code_on_cuda(monkeypatch, objective):
    from emo_trainer.objectives import chunked_objective_loss, get_objective

    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(4, 256, 64, device="cuda", generator=g)
    weight = torch.randn(5000, 64, device="cuda", generator=g) * 0.2
    labels = torch.randint(0, 5000, (4, 256), device="cuda", generator=g)
    out = {}
    for mode in ("0", "auto"):
        monkeypatch.setenv("EMO_TRAINER_TRITON", mode)
        obj = get_objective(objective, **({"cost_embedding": weight.detach().cpu()} if objective == "emo" else {}))
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        full = obj(h @ w.T, labels, num_items_in_batch=900)
        full.loss.backward()
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        chunk = chunked_objective_loss(obj, h2, w2, labels, num_items_in_batch=900, chunk_size=300)
        chunk.loss.backward()
        out[mode] = (full.loss.item(), h.grad, w.grad, chunk.loss.item(), h2.grad, w2.grad)
    a, b = out["0"], out["auto"]
    for i in (0, 3):
        assert abs(a[i] - b[i]) <= 1e-5 * abs(a[i])
    for i in (1, 2, 4, 5):
        assert _rel(b[i], a[i]) < 1e-5, i
