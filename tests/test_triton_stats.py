"""The Triton kernels of ``softmax_stats`` (used on CUDA), run here with Triton's CPU interpreter.

Each kernel result is checked against float64 references (value and gradient), against the
PyTorch code of ``fused.py`` (the path CPUs take), and through ``ObjectiveTrainer`` on both loss
paths.  The interpreter executes the same kernel source the GPU compiles (one program per row,
blocks of 128 columns here, so a 300-word vocabulary spans three blocks with a masked tail).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import TrainingArguments

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("Triton's interpreter is off (TRITON_INTERPRET != 1)", allow_module_level=True)

from emo_trainer.data import CausalLMCollator
from emo_trainer.ops import fused, triton_stats
from emo_trainer.ops.fused import softmax_stats
from emo_trainer.trainer import ObjectiveTrainer

VOCAB = 300


@pytest.fixture
def interpret(monkeypatch):
    """Route CPU tensors through the Triton kernels (interpreted); count the launches."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EMO_TRAINER_TRITON", "interpret")
    calls = {"stats": 0, "grad": 0}
    real_stats, real_grad = triton_stats.row_stats, triton_stats.row_grad

    def stats(*a, **k):
        calls["stats"] += 1
        return real_stats(*a, **k)

    def grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    monkeypatch.setattr(triton_stats, "row_stats", stats)
    monkeypatch.setattr(triton_stats, "row_grad", grad)
    return calls


def _reference(z64, y, e_hat64=None, valid_cols=None):
    """Float64 CE, entropy and D from plain formulas (full V×V cost matrix for D)."""
    logp = torch.log_softmax(z64, -1)
    q = logp.exp()
    out = {"ce": -logp.gather(1, y[:, None]).squeeze(1),
           "entropy": -(q * torch.where(q > 0, logp, torch.zeros_like(logp))).sum(-1)}
    if e_hat64 is not None:
        cost = 1.0 - e_hat64 @ e_hat64.T
        cost.diagonal().copy_((e_hat64.norm(dim=-1) == 0).double())
        out["demd"] = (q * cost[y]).sum(-1)
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _data(n=13, vocab=VOCAB, dc=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z64 = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, vocab, (n,), generator=g)
    emb = torch.randn(vocab, dc, generator=g, dtype=torch.float64)
    emb[3] = 0.0  # an all-zero row: self-cost 1
    y[0] = 3
    return z64, y, torch.nn.functional.normalize(emb, dim=-1), g


def test_dispatch_rules(monkeypatch):
    z = torch.zeros(2, 5)
    monkeypatch.delenv("EMO_TRAINER_TRITON", raising=False)
    assert not triton_stats.usable(z)  # CPU tensors take the PyTorch code
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EMO_TRAINER_TRITON", "interpret")
    assert triton_stats.usable(z) and triton_stats.usable(z.bfloat16())
    assert not triton_stats.usable(z.double())  # float64 stays on the PyTorch code
    monkeypatch.setenv("EMO_TRAINER_TRITON", "0")
    assert not triton_stats.usable(z)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=str)
@pytest.mark.parametrize("keys", [("ce",), ("entropy",), ("demd",), ("ce", "entropy", "demd")], ids="+".join)
def test_values_and_gradients_against_float64(interpret, dtype, tol, keys):
    z64, y, e_hat, g = _data()
    z = z64.to(dtype).requires_grad_(True)
    want_d = "demd" in keys
    got = softmax_stats(z, y, entropy="entropy" in keys, cost=e_hat.float() if want_d else None,
                        block_elements=5 * VOCAB)  # EMO: three row blocks (5, 5, 3)
    z_ref = z.detach().double().requires_grad_(True)  # the reference at the same rounded inputs
    ref = _reference(z_ref, y, e_hat if want_d else None)
    for k in keys:
        assert got[k].dtype == torch.float32 and _rel(got[k].detach(), ref[k].detach()) < max(tol, 1e-6), k
    weights = {k: torch.randn(len(y), generator=g, dtype=torch.float64) for k in keys}
    (grad,) = torch.autograd.grad(sum((got[k] * weights[k].float()).sum() for k in keys), z)
    (grad_ref,) = torch.autograd.grad(sum((ref[k] * weights[k]).sum() for k in keys), z_ref)
    assert grad.dtype == dtype and _rel(grad, grad_ref) < tol
    assert interpret["stats"] >= 1 and interpret["grad"] >= 1  # the kernels ran
    if want_d:
        assert interpret["stats"] == 3 and interpret["grad"] == 3  # one launch per row block


@pytest.mark.parametrize("keys", [("ce",), ("ce", "entropy", "demd")], ids="+".join)
def test_kernels_match_the_pytorch_code(monkeypatch, keys):
    z64, y, e_hat, _ = _data(n=20, seed=4)
    results = {}
    for mode in ("0", "interpret"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("EMO_TRAINER_TRITON", mode)
        z = z64.float().requires_grad_(True)
        out = softmax_stats(z, y, entropy="entropy" in keys, cost=e_hat.float() if "demd" in keys else None)
        w = torch.linspace(0.5, 1.5, len(y))
        sum(((i + 1) * w * out[k]).sum() for i, k in enumerate(keys)).backward()
        results[mode] = ({k: out[k].detach() for k in keys}, z.grad)
    (a, ga), (b, gb) = results["0"], results["interpret"]
    for k in keys:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter computes 0·∞ before tl.where
def test_online_softmax_rescaling_and_extreme_logits(interpret):
    """The max in the last column block, huge magnitudes, −inf columns: still exact."""
    z64, y, e_hat, _ = _data(n=6, seed=2)
    z64[0, -1] = 80.0  # the max sits in the masked tail block: every running sum is rescaled
    z64[1] *= 1e3  # |z| ~ 3000: exp overflows without the running max
    z64[2, :250] = float("-inf")  # masked-out columns (y[2] must be allowed)
    y[2] = 260
    z64[3] = 0.0  # a uniform row
    z64[3, 7] = -1e4
    z = z64.float().requires_grad_(True)
    got = softmax_stats(z, y, entropy=True, cost=e_hat.float())
    z_ref = z.detach().double().requires_grad_(True)
    ref = _reference(z_ref, y, e_hat)
    for k in ("ce", "entropy", "demd"):
        assert torch.isfinite(got[k]).all(), k
        torch.testing.assert_close(got[k].double(), ref[k].detach(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad((got["ce"] + got["entropy"] + got["demd"]).sum(), z)
    (grad_ref,) = torch.autograd.grad((ref["ce"] + ref["entropy"] + ref["demd"]).sum(), z_ref)
    assert torch.isfinite(grad).all()
    assert (grad[2, :250] == 0).all()  # a −inf logit gets no gradient (not 0·∞ = nan)
    torch.testing.assert_close(grad.double(), grad_ref.nan_to_num(0.0), rtol=1e-4, atol=1e-6)


def _step(objective, path, options, tmp_path):
    model = make_tiny_gpt2(vocab_size=VOCAB, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, objective=objective, objective_options=options,
                               loss_path=path, chunk_size=16)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (24, 17)]
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": r} for r in rows])
    loss = trainer.compute_loss(model, batch, num_items_in_batch=40)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective,options", [("mle", {}), ("mixce", {"eta": 0.3}), ("mile", {"gamma": 1.0}),
                                               ("emo", {"mode": 1})], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("path", ["full", "chunked"])
def test_trainer_loss_paths_with_the_kernels(monkeypatch, tmp_path, objective, options, path):
    """compute_loss on a tiny GPT-2: the kernels give the PyTorch code's loss and gradients (fp32, 1e-5)."""
    out = {}
    for mode in ("0", "interpret"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("EMO_TRAINER_TRITON", mode)
        out[mode] = _step(objective, path, options, tmp_path)
    (la, ga), (lb, gb) = out["0"], out["interpret"]
    assert abs(la - lb) <= 1e-5 * max(1.0, abs(la))
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert _rel(gb[name], ga[name]) < 1e-5, name


def test_fused_module_uses_the_kernels_only_when_usable(monkeypatch):
    """Without the interpreter switch a CPU tensor never reaches Triton (the kernels need a GPU)."""
    monkeypatch.delenv("EMO_TRAINER_TRITON", raising=False)
    monkeypatch.setattr(triton_stats, "row_stats", lambda *a, **k: pytest.fail("Triton used on CPU"))
    z64, y, e_hat, _ = _data(n=4)
    fused.softmax_stats(z64.float(), y, entropy=True, cost=e_hat.float())


def test_transport_operands_are_padded_and_cached():
    """EMO's kernel path pads Ê to a multiple of 64 rows (aligned GEMMs for odd vocabularies),
    once per cost tensor, and again only if the tensor is modified in place."""
    cost = torch.randn(300, 8)
    padded = fused._padded_cost(cost)
    assert padded.shape == (320, 8) and torch.equal(padded[:300], cost) and (padded[300:] == 0).all()
    assert fused._padded_cost(cost) is padded  # cached
    cost.mul_(2.0)  # a live cost embedding renormalised in place
    again = fused._padded_cost(cost)
    assert again is not padded and torch.equal(again[:300], cost)
    aligned = torch.randn(128, 8)
    assert fused._padded_cost(aligned) is aligned


def test_a_triton_that_cannot_build_falls_back_once(interpret, monkeypatch, caplog):
    """First launch fails (e.g. no backend for this GPU): one warning, the PyTorch code, kernels off.
    A failure after the kernels have worked is raised, not hidden."""
    import logging

    monkeypatch.setitem(triton_stats._state, "worked", False)
    monkeypatch.setitem(triton_stats._state, "disabled", False)

    def broken():
        raise RuntimeError("no Triton backend for this device")

    monkeypatch.setattr(triton_stats, "_kernels", broken)
    z64, y, _, _ = _data(n=5)
    with caplog.at_level(logging.WARNING, logger="emo_trainer.ops.triton_stats"):
        got = softmax_stats(z64.float(), y, entropy=True)
    assert "failed" in caplog.text and triton_stats._state["disabled"]
    ref = _reference(z64.float().double(), y)
    torch.testing.assert_close(got["ce"].double(), ref["ce"], rtol=1e-5, atol=1e-6)
    assert not triton_stats.usable(z64.float())
    monkeypatch.setitem(triton_stats._state, "disabled", False)
    monkeypatch.setitem(triton_stats._state, "worked", True)  # they ran before: a new failure is real
    with pytest.raises(RuntimeError, match="no Triton backend"):
        softmax_stats(z64.float(), y)
