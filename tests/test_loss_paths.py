"""The two loss paths: full logits vs chunked hidden states, and what each keeps for backward.

Every registered objective goes through ``ObjectiveTrainer.compute_loss`` on a tiny GPT-2 with
``loss_path="full"`` and ``loss_path="chunked"`` (tied and untied heads, a head bias, LoRA,
``torch.compile``): same loss and same parameter gradients in fp32 (1e-5).

Memory is checked device-independently with ``torch.autograd.graph.saved_tensors_hooks``:
the tensors autograd keeps between forward and backward are recorded, and those of N×V size
(N positions, V vocabulary) are counted by storage.  The built-in loss keeps one (its fp32
log-softmax); the full path keeps only the logits the model returned (no new N×V tensor: in
bf16 half the bytes of the built-in's); the chunked path keeps none.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives import available
from emo_trainer.trainer import ObjectiveTrainer

VOCAB = 300
BATCH, LENGTH = 2, 24  # N = 48 positions: N×V = 14400 > every other saved tensor of the tiny model
CHUNK = 16  # < N: the chunked path really chunks (3 chunks)
TOL = 1e-5

OPTIONS = {
    "mle": {},
    "emo": {"mode": 1},
    "mixce": {"eta": 0.3},
    "mile": {"gamma": 1.0},
    # offline variant (no sampling), with backspace augmentation so Q/V statistics are used
    "sequencematch": {"sample_every": 0, "noise_rate": 0.3, "mix": 0.5, "seed": 0},
}


@pytest.fixture(scope="module")
def bk_tokenizer():
    """A private tokenizer for SequenceMatch (add_backspace_token mutates it)."""
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    return train_bpe_tokenizer(make_corpus(60, seed=1), vocab_size=VOCAB)


def _model(tied: bool = True, bias: bool = False, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, tie_word_embeddings=tied,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    if bias:  # GPT-2's head has no bias: give it one (nonzero) to test the bias gradient
        head = model.lm_head
        new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        new.weight = head.weight  # keep the tie
        torch.nn.init.normal_(new.bias, std=0.5)
        model.lm_head = new
    return model


def _batch(vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (LENGTH, LENGTH - 7)]
    return CausalLMCollator(pad_token_id=0)([{"input_ids": r} for r in rows])


def _trainer(model, objective: str, tmp_path, tokenizer=None, **kw) -> ObjectiveTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=BATCH, disable_tqdm=True)
    return ObjectiveTrainer(model=model, args=args, objective=objective, objective_options=OPTIONS.get(objective, {}),
                            processing_class=tokenizer, chunk_size=CHUNK, **kw)


def _setup(objective: str, tied: bool, tmp_path, bk_tokenizer, bias: bool = False):
    model = _model(tied=tied, bias=bias)
    tokenizer = None
    if objective == "sequencematch":
        from emo_trainer.objectives.sequencematch.backspace import add_backspace_token

        tokenizer = copy.deepcopy(bk_tokenizer)
        add_backspace_token(model, tokenizer)
    trainer = _trainer(model, objective, tmp_path, tokenizer)
    # The same split batch for both paths (SequenceMatch's augmentation is random).
    split, cache = trainer.objective.split_batch, {}

    def split_once(m, batch):
        if "v" not in cache:
            cache["v"] = split(m, batch)
        return dict(cache["v"][0]), dict(cache["v"][1])

    trainer.objective.split_batch = split_once
    return trainer, model


def _loss_and_grads(trainer, model, path: str, batch, num_items=None):
    trainer.loss_path = path
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, metrics


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same(full, chunked, tol=TOL):
    (lf, gf, mf), (lc, gc, mc) = full, chunked
    assert abs(lf - lc) <= tol * max(1.0, abs(lf)), (lf, lc)
    assert gf.keys() == gc.keys() and gf
    for name in gf:
        assert _rel(gc[name], gf[name]) < tol, (name, _rel(gc[name], gf[name]))
    for k, v in mf.items():
        assert abs(v - mc[k]) <= tol * max(1.0, abs(v)), (k, v, mc[k])


# ---------------------------------------------------------------------- fused statistics
def _stats_ref(z64: torch.Tensor, y: torch.Tensor, e_hat64: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 CE, entropy and EMO's D by plain autograd formulas (full cost matrix)."""
    logp = torch.log_softmax(z64, -1)
    q = logp.exp()
    cost = 1.0 - e_hat64 @ e_hat64.T
    cost.diagonal().copy_((e_hat64.norm(dim=-1) == 0).double())  # a token's cost to itself: 0 (1 for a zero row)
    return {"ce": -logp.gather(1, y[:, None]).squeeze(1), "entropy": -(q * logp).sum(-1), "demd": (q * cost[y]).sum(-1)}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("block_rows", [1, 5, 1000])
def test_fused_stats_values_and_gradients(dtype, tol, block_rows):
    from emo_trainer.ops.fused import softmax_stats

    g = torch.Generator().manual_seed(0)
    n, vocab, dc = 13, 37, 6
    z64 = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, vocab, (n,), generator=g)
    emb = torch.randn(vocab, dc, generator=g, dtype=torch.float64)
    emb[3] = 0.0  # an all-zero row: self-cost 1, as in the cosine cost
    e_hat = torch.nn.functional.normalize(emb, dim=-1)
    y[0] = 3
    z = z64.to(dtype).requires_grad_(True)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    got = softmax_stats(z, y, entropy=True, cost=e_hat.to(ct), block_elements=block_rows * vocab)
    z_ref = z.detach().double().requires_grad_(True)  # the reference at the same rounded inputs
    ref = _stats_ref(z_ref, y, e_hat)
    for keys in (("ce",), ("entropy",), ("demd",), ("ce", "entropy", "demd")):
        weights = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in keys}
        (grad,) = torch.autograd.grad(sum((got[k] * weights[k].to(ct)).sum() for k in keys), z, retain_graph=True)
        (grad_ref,) = torch.autograd.grad(sum((ref[k] * weights[k]).sum() for k in keys), z_ref, retain_graph=True)
        assert grad.dtype == dtype
        assert _rel(grad, grad_ref) < tol, keys
    for k in ("ce", "entropy", "demd"):
        assert got[k].dtype == ct and _rel(got[k].detach(), ref[k].detach()) < max(tol, 1e-6), k


@pytest.mark.parametrize("kernels", ["pytorch", "triton"])
def test_fused_demd_keeps_relative_precision_near_zero(kernels, monkeypatch):
    """q on the gold token: D down to 1e-17, still accurate (no 1 − (1 − D) cancellation) —
    in the PyTorch code and in the Triton kernels (CPU interpreter, see test_triton_stats.py)."""
    from emo_trainer.ops.fused import self_costs, softmax_stats

    if kernels == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton's interpreter is off")
        monkeypatch.setenv("EMO_TRAINER_TRITON", "interpret")

    g = torch.Generator().manual_seed(1)
    vocab = 50
    z = torch.randn(4, vocab, generator=g)
    y = torch.tensor([0, 7, 8, 9])
    z[torch.arange(4), y] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # rows of ±0.5 on 4 of 8 coordinates: exactly unit norm and exact cosines in fp32
    signs = torch.randint(0, 2, (vocab, 8), generator=g).float() * 2 - 1
    keep = torch.rand(vocab, 8, generator=g).argsort(-1) < 4
    e_hat = torch.where(keep, 0.5 * signs, torch.zeros_like(signs))
    assert torch.equal(e_hat.pow(2).sum(-1), torch.ones(vocab))
    got = softmax_stats(z, y, cost=e_hat)["demd"]
    ref = _stats_ref(z.double(), y, e_hat.double())["demd"]
    assert (ref > 0).all() and ref.min() < 1e-15
    assert ((got.double() - ref).abs() <= 1e-5 * ref).all(), (got, ref)
    # the bf16 transport product keeps D to ~1e-2 relative, also near zero
    got_bf16 = softmax_stats(z, y, cost=e_hat.to(torch.bfloat16), self_cost=self_costs(e_hat))["demd"]
    assert ((got_bf16.double() - ref).abs() <= 2e-2 * ref).all(), (got_bf16, ref)


def test_fused_stats_ignore_autocast():
    from emo_trainer.ops.fused import softmax_stats

    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 40, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (6,), generator=g)
    e_hat = torch.nn.functional.normalize(torch.randn(40, 5, generator=g), dim=-1)
    plain = softmax_stats(z, y, cost=e_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = softmax_stats(z, y, cost=e_hat)
    for k in plain:
        assert cast[k].dtype == torch.float32 and torch.equal(cast[k], plain[k]), k


def test_chunked_backward_replays_the_fused_statistics(monkeypatch):
    """The chunk recompute in backward reuses the forward's row statistics: no second stats pass."""
    from emo_trainer.objectives import chunked_objective_loss, get_objective
    from emo_trainer.ops import fused

    passes = []
    real_blocks = fused._blocks
    monkeypatch.setattr(fused, "_blocks", lambda *a: passes.append(a) or real_blocks(*a))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 12), generator=g)
    obj = get_objective("emo", cost_embedding=torch.randn(30, 4, generator=g))
    out = chunked_objective_loss(obj, hidden, weight, labels, chunk_size=8)  # 3 chunks (+ a 1-row probe)
    n_forward = len(passes)
    out.loss.backward()
    assert n_forward == 1 + 3 and len(passes) - n_forward == 3  # backward: one (gradient) pass per chunk


# ---------------------------------------------------------------------- full == chunked
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("objective", available())
def test_full_and_chunked_paths_agree(objective, tied, tmp_path, bk_tokenizer):
    trainer, model = _setup(objective, tied, tmp_path, bk_tokenizer)
    batch = _batch()
    n_items = int((batch["labels"][:, 1:] != -100).sum()) + 3  # as under gradient accumulation
    full = _loss_and_grads(trainer, model, "full", batch, n_items)
    chunked = _loss_and_grads(trainer, model, "chunked", batch, n_items)
    _assert_same(full, chunked)
    assert model.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward  # head restored
    if not tied:
        assert "lm_head.weight" in full[1]


@pytest.mark.parametrize("objective", ["mle", "emo", "mile"])
def test_head_bias_gets_the_same_gradient(objective, tmp_path, bk_tokenizer):
    trainer, model = _setup(objective, True, tmp_path, bk_tokenizer, bias=True)
    full = _loss_and_grads(trainer, model, "full", _batch())
    chunked = _loss_and_grads(trainer, model, "chunked", _batch())
    _assert_same(full, chunked)
    assert "lm_head.bias" in full[1]


def test_chunked_under_autocast_matches_full(tmp_path):
    """bf16 autocast: the chunked matmuls run in bf16 like the model's head; results agree to bf16 precision."""
    trainer = _trainer(_model(), "emo", tmp_path)
    model = trainer.model
    out = {}
    for path in ("full", "chunked"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[path] = _loss_and_grads(trainer, model, path, _batch())
    (lf, gf, _), (lc, gc, _) = out["full"], out["chunked"]
    assert abs(lf - lc) <= 1e-2 * abs(lf)
    for name in gf:
        assert _rel(gc[name], gf[name]) < 3e-2, name


def test_lora_model_paths_agree(tmp_path):
    peft = pytest.importorskip("peft")
    for objective in ("emo", "mile"):
        base = _model(tied=True)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                          lora_dropout=0.0, fan_in_fan_out=True))
        trainer = _trainer(model, objective, tmp_path)
        full = _loss_and_grads(trainer, model, "full", _batch())
        chunked = _loss_and_grads(trainer, model, "chunked", _batch())
        _assert_same(full, chunked)
        assert full[1] and all("lora_" in name for name in full[1])  # only the adapters train


@pytest.mark.slow
def test_torch_compile_model_with_chunked_path(tmp_path):
    """A compiled model (aot_eager: fast, same tracing as inductor) on both paths, vs eager."""
    eager = make_tiny_gpt2(vocab_size=VOCAB)
    trainer = _trainer(eager, "emo", tmp_path)
    ref = _loss_and_grads(trainer, eager, "full", _batch())
    compiled = torch.compile(eager, backend="aot_eager")
    for path in ("chunked", "full"):
        got = _loss_and_grads(trainer, compiled, path, _batch())
        _assert_same(ref, got)
    # after a chunked step the compiled model still returns logits, not hidden states
    with torch.no_grad():
        assert compiled(input_ids=_batch()["input_ids"]).logits.shape[-1] == VOCAB


# ---------------------------------------------------------------------- fallbacks
def test_chunked_falls_back_for_a_non_linear_head(tmp_path, caplog):
    model = _model()
    ref_trainer = _trainer(_model(), "mle", tmp_path)
    ref = _loss_and_grads(ref_trainer, ref_trainer.model, "full", _batch())
    model.lm_head = torch.nn.Sequential(model.lm_head)  # e.g. a wrapped / adapted head
    trainer = _trainer(model, "mle", tmp_path, loss_path="chunked")
    with caplog.at_level(logging.WARNING, logger="emo_trainer.trainer"):
        got = _loss_and_grads(trainer, model, "chunked", _batch())
    assert "falls back to full logits" in caplog.text and "Sequential" in caplog.text
    assert abs(got[0] - ref[0]) < 1e-6


@pytest.mark.parametrize("attr,value,words", [
    ("final_logit_softcapping", 30.0, "soft-capping"),
    ("logit_scale", 0.5, "soft-capping"),
])
def test_chunked_falls_back_for_post_head_logit_transforms(attr, value, words, tmp_path, caplog):
    model = _model()
    setattr(model.config, attr, value)
    trainer = _trainer(model, "emo", tmp_path, loss_path="chunked")
    with caplog.at_level(logging.WARNING, logger="emo_trainer.trainer"):
        loss, _, _ = _loss_and_grads(trainer, model, "chunked", _batch())
    assert "falls back to full logits" in caplog.text and words in caplog.text
    assert torch.isfinite(torch.tensor(loss))


def test_chunked_falls_back_for_a_sharded_head(tmp_path, caplog):
    model = _model()
    model.lm_head.weight.ds_numel = model.lm_head.weight.numel()  # what DeepSpeed ZeRO-3 marks
    trainer = _trainer(model, "mile", tmp_path, loss_path="chunked")
    with caplog.at_level(logging.WARNING, logger="emo_trainer.trainer"):
        _loss_and_grads(trainer, model, "chunked", _batch())
    assert "sharded" in caplog.text


# ---------------------------------------------------------------------- saved tensors
class SavedTensors:
    """Records every tensor autograd saves for backward (forward *and* backward passes)."""

    def __init__(self):
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        def pack(t):
            self.saved.append(t)
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def nxv(self, n: int, vocab: int) -> dict[int, torch.Tensor]:
        """Distinct storages of saved tensors holding at least n×V values of width V."""
        out = {}
        for t in self.saved:
            if t.dim() >= 1 and t.shape[-1] == vocab and t.numel() >= n * vocab:
                out[t.untyped_storage().data_ptr()] = t
        return out


def _saved_nxv(trainer, model, path: str, batch, dtype=torch.float32, builtin=False):
    """(N×V storages saved, storage of what the lm_head returned)."""
    model.to(dtype).train()
    trainer.loss_path = path
    returned = {}

    def record(module, args, output):  # returns None: the output is left alone
        returned.setdefault("ptr", output.untyped_storage().data_ptr())

    hook = model.lm_head.register_forward_hook(record)
    try:
        with SavedTensors() as rec:
            if builtin:
                loss = model(**batch).loss
            else:
                loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
    finally:
        hook.remove()
    n = batch["input_ids"].numel()
    return rec.nxv(n, model.lm_head.out_features), returned.get("ptr")


@pytest.mark.parametrize("objective", available())
def test_saved_tensor_accounting(objective, tmp_path, bk_tokenizer):
    trainer, model = _setup(objective, True, tmp_path, bk_tokenizer)
    del trainer.objective.split_batch  # no cached split here: dtypes change below
    batch = _batch()

    # The built-in loss: one N×V tensor (its fp32 log-softmax), not the logits.
    saved, logits_ptr = _saved_nxv(trainer, model, "full", batch, builtin=True)
    assert len(saved) == 1 and logits_ptr not in saved

    # Full path: at most one N×V tensor, and for the fused objectives it is the model's own
    # logits (kept alive anyway) — no new N×V tensor, in fp32 and in bf16.
    fused = trainer.objective.fp32_math_inside
    for dtype in (torch.float32, torch.bfloat16):
        saved, logits_ptr = _saved_nxv(trainer, model, "full", batch, dtype)
        assert len(saved) <= 1, {k: (v.shape, v.dtype) for k, v in saved.items()}
        if fused:
            assert set(saved) == {logits_ptr}
            assert next(iter(saved.values())).dtype == dtype  # bf16 logits stay bf16: half the built-in's bytes

    # Chunked path: nothing of N×V size, in the forward or the backward pass.
    saved, _ = _saved_nxv(trainer, model, "chunked", batch, torch.float32)
    assert saved == {}


def test_chunked_emo_builds_its_transport_matrix_once(monkeypatch):
    """Under bf16 autocast every chunk (and the shape probe) sees bf16 logits: Ê in the transport
    dtype and its self-costs (a float64 pass over V×d_c) are made once, not once per step."""
    from emo_trainer.objectives import chunked_objective_loss, emo, get_objective

    made = []
    real = emo.self_costs
    monkeypatch.setattr(emo, "self_costs", lambda c: made.append(c.dtype) or real(c))
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 12), generator=g)
    obj = get_objective("emo", cost_embedding=torch.randn(30, 4, generator=g))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_objective_loss(obj, hidden, weight, labels, chunk_size=8)
        out.loss.backward()
    assert len(made) == 1
    assert obj._transport(torch.zeros(1, 30, dtype=torch.bfloat16))[0].dtype == torch.bfloat16  # auto: bf16 products


@pytest.mark.parametrize("vocab", [128, 130], ids=["aligned", "padded"])
def test_chunked_head_padding_is_invisible(vocab):
    """The chunk matmuls pad V to a multiple of 64 (fast GPU kernels); values and gradients are
    those of the unpadded head, including the bias and its gradient."""
    from emo_trainer.objectives import chunked_objective_loss, get_objective
    from emo_trainer.ops import chunked

    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 20, 8, generator=g)
    weight = torch.randn(vocab, 8, generator=g)
    bias = torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 20), generator=g)
    w_pad, b_pad = chunked._padded_head(weight, bias, torch.float32)
    assert w_pad.shape[0] % chunked.VOCAB_ALIGN == 0 and w_pad.shape[0] - vocab < chunked.VOCAB_ALIGN
    assert (w_pad[vocab:] == 0).all() and (b_pad[vocab:] == 0).all()
    for name in ("mle", "mile"):
        obj = get_objective(name)
        res = []
        for path in ("full", "chunked"):
            h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
            if path == "full":
                out = obj(h @ w.T + b, labels)
            else:
                out = chunked_objective_loss(obj, h, w, labels, bias=b, chunk_size=16)
            out.loss.backward()
            res.append((out.loss.detach(), h.grad, w.grad, b.grad))
        for a, c in zip(*res):
            assert a.shape == c.shape
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
