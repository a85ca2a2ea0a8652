"""Triton kernels for the ecosystem's objectives (issue 17), run with Triton's CPU interpreter:

* logsumexp and the mean of the finite logits as differentiable statistics of ``softmax_stats``
  (``mle``'s z-loss and label smoothing): their gradients folded into the one backward kernel
  (``HAS_A``, ``HAS_M``), alone, with CE, and with the entropy;
* EAFT's top-k entropy kernel (``ops/triton_topk.py``: running top-k, no sort of the row) against a
  full sort, with −∞ columns and k ≥ V, and its fallback to ``torch.topk``;
* ``ObjectiveTrainer`` on both loss paths: the kernels give the PyTorch code's loss and gradients.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import make_tiny_gpt2
from reference_losses import rel_err, topk_entropy_ref
from transformers import TrainingArguments

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("Triton's interpreter is off (TRITON_INTERPRET != 1)", allow_module_level=True)

from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives.eaft import topk_entropy
from emo_trainer.ops import triton_stats, triton_topk
from emo_trainer.ops.fused import softmax_stats
from emo_trainer.trainer import ObjectiveTrainer


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EMO_TRAINER_TRITON", "interpret")
    calls = {"grad": 0, "topk": 0}
    real_grad, real_topk = triton_stats.row_grad, triton_topk.topk_entropy

    def grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    def topk(*a, **k):
        calls["topk"] += 1
        return real_topk(*a, **k)

    monkeypatch.setattr(triton_stats, "row_grad", grad)
    monkeypatch.setattr(triton_topk, "topk_entropy", topk)
    monkeypatch.setitem(triton_topk._state, "disabled", False)
    return calls


@pytest.mark.parametrize("keys", [("lse",), ("ce", "lse"), ("ce", "entropy", "lse"), ("logit_mean",),
                                  ("ce", "lse", "logit_mean"), ("ce", "entropy", "logit_mean")], ids="+".join)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=str)
def test_lse_and_logit_mean_value_and_gradient_in_the_kernels(interpret, keys, dtype, tol):
    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(7, 300, generator=g, dtype=torch.float64) * 3
    z64[1, 5:40] = float("-inf")
    y = torch.randint(0, 300, (7,), generator=g)
    z = z64.to(dtype).requires_grad_(True)
    got = softmax_stats(z, y, entropy="entropy" in keys, lse=True, logit_mean=True)
    ref_z = z.detach().double().requires_grad_(True)
    logp = torch.log_softmax(ref_z, -1)
    p = logp.exp()
    ref = {"lse": torch.logsumexp(ref_z, -1), "ce": -logp.gather(1, y[:, None]).squeeze(1),
           "entropy": -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)}
    finite = torch.isfinite(ref_z)
    ref["logit_mean"] = torch.where(finite, ref_z, torch.zeros_like(ref_z)).sum(-1) / finite.sum(-1)
    weights = {k: torch.randn(7, generator=g, dtype=torch.float64) for k in keys}
    (grad,) = torch.autograd.grad(sum((got[k] * weights[k].float()).sum() for k in keys), z)
    (grad_ref,) = torch.autograd.grad(sum((ref[k] * weights[k]).sum() for k in keys), ref_z)
    assert interpret["grad"] == 1 and grad.dtype == dtype
    assert rel_err(got["lse"], ref["lse"]) < 1e-6 and rel_err(got["logit_mean"], ref["logit_mean"]) < 1e-6
    assert rel_err(grad, grad_ref) < tol
    assert float(grad[1, 5:40].abs().max()) == 0.0


@pytest.mark.parametrize("vocab,k", [(150, 20), (150, 1), (150, 3), (5, 20), (40, 32)])
def test_topk_entropy_kernel_against_a_full_sort(interpret, vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    z = torch.randn(4, vocab, generator=g) * 3
    z[1, : vocab - 2] = float("-inf")  # 2 finite columns, fewer than k
    z[2] = z[2].sort().values  # increasing: every block enters the running top k
    for dtype in (torch.float32, torch.bfloat16):
        got = topk_entropy(z.to(dtype), k)
        ref = topk_entropy_ref(z.to(dtype).double(), k)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=2e-6), (got, ref)
    assert interpret["topk"] == 2


def test_topk_kernel_failure_falls_back_to_torch_once(interpret, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no tl.topk in this Triton")

    monkeypatch.setattr(triton_topk.triton, "jit", broken)
    monkeypatch.setattr(triton_topk, "_JITTED", {})
    z = torch.randn(3, 50)
    with caplog.at_level(logging.WARNING, logger="emo_trainer.ops.triton_topk"):
        got = topk_entropy(z, 20)
    assert "torch.topk instead" in caplog.text and triton_topk._state["disabled"]
    assert torch.allclose(got.double(), topk_entropy_ref(z.double(), 20), atol=1e-6)
    assert not triton_topk.usable(z)


def _step(objective, path, options, tmp_path):
    model = make_tiny_gpt2(vocab_size=300)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, objective=objective, objective_options=options,
                               loss_path=path, chunk_size=16)
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (12, 9)]
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": r} for r in rows])
    loss = trainer.compute_loss(model, batch, num_items_in_batch=25)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective,options", [("mle", {"label_smoothing": 0.1, "z_loss": 1e-2}),
                                               ("eaft", {"top_k": 2}), ("focal", {"gamma": 2.0})],
                         ids=["mle-options", "eaft", "focal"])
@pytest.mark.parametrize("path", ["full", "chunked"])
def test_trainer_loss_paths_with_the_kernels(monkeypatch, tmp_path, objective, options, path):
    out = {}
    for mode in ("0", "interpret"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("EMO_TRAINER_TRITON", mode)
        monkeypatch.setitem(triton_topk._state, "disabled", False)
        out[mode] = _step(objective, path, options, tmp_path)
    (la, ga), (lb, gb) = out["0"], out["interpret"]
    assert abs(la - lb) <= 1e-5 * max(1.0, abs(la))
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert rel_err(gb[name], ga[name]) < 1e-5, name
