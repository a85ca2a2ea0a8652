"""EMO objective: float64 reference, closed-form gradient, modes, cap, cost-embedding sources."""

from __future__ import annotations

import io
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from reference_losses import (
    _flat_shifted,
    assert_bf16_model_finite,
    assert_chunked_matches,
    assert_empty_batch_is_zero,
    check_against_reference,
    emo_demd_ref,
    emo_ref,
    grad_accumulation_check,
    make_batch,
    num_targets,
    objective_loss,
    rel_err,
    value_and_grad,
)
from transformers import GPT2Config, GPT2LMHeadModel

from emo_trainer.objectives import ObjectiveError, get_objective
from emo_trainer.objectives.emo import EmoObjective

VOCABS = (7, 50, 257)
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def cost_matrix(vocab: int, dim: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def tiny_gpt2(n_embd: int = 16, vocab: int = 50, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=32))


# ---------------------------------------------------------------------- formula
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,ratio_cap", [(1, 3.0), (1, None), (2, 3.0)])
def test_matches_float64_reference(vocab, dtype, mode, ratio_cap):
    logits, labels = make_batch(4, 6, vocab, seed=vocab)
    emb = cost_matrix(vocab)
    obj = get_objective("emo", cost_embedding=emb, mode=mode, ratio_cap=ratio_cap)
    ref = partial(emo_ref, cost_embedding=emb, mode=mode, ratio_cap=ratio_cap)
    for num_items in (None, num_targets(labels) + 5):
        check_against_reference(obj, ref, logits, labels, dtype, num_items)


@pytest.mark.parametrize("vocab", VOCABS)
def test_demd_closed_form_gradient(vocab):
    g = torch.Generator().manual_seed(vocab)
    z = (torch.randn(9, vocab, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, vocab, (9,), generator=g)
    emb = cost_matrix(vocab)
    obj = EmoObjective(cost_embedding=emb)
    demd = obj.token_stats(z, y)["demd"]
    # gather + matmul == full cost matrix (Ê is kept in fp32, hence 1e-6 and not 1e-12)
    assert rel_err(demd, emo_demd_ref(z, y, emb)) < 1e-6
    (grad,) = torch.autograd.grad(demd.sum(), z)  # row i of D depends on row i of z only
    e_hat = obj.cost_embedding.double()
    s = e_hat[y] @ e_hat.T  # s_v = ê_v·ê_{y_i}
    q = torch.softmax(z.detach(), -1)
    closed_form = q * ((q * s).sum(-1, keepdim=True) - s)
    assert rel_err(grad, closed_form) < 1e-10
    # ... and numerically: central differences of Σ D along random directions.
    demd_sum = lambda t: float(obj.token_stats(t, y)["demd"].sum())
    for _ in range(3):
        u = torch.randn(z.shape, generator=g, dtype=torch.float64)
        h = 1e-5
        numeric = (demd_sum(z.detach() + h * u) - demd_sum(z.detach() - h * u)) / (2 * h)
        assert numeric == pytest.approx(float((closed_form * u).sum()), rel=1e-6, abs=1e-9)


def test_mode1_uncapped_value_is_ce_but_gradient_is_not():
    logits, labels = make_batch(4, 6, 50, seed=3)
    obj = EmoObjective(cost_embedding=cost_matrix(50), mode=1, ratio_cap=None)
    mle = get_objective("mle")
    loss, grad = value_and_grad(lambda z: objective_loss(obj, z, labels), logits)
    ce, ce_grad = value_and_grad(lambda z: objective_loss(mle, z, labels), logits)
    assert rel_err(loss, ce) < 1e-5  # ½[CE + CE·D/(D+ε)] = CE up to ε
    assert rel_err(grad, ce_grad) > 0.05


def test_ratio_cap_binds_when_cost_is_small():
    # Nearly identical embedding rows: D ≈ 0 for every prediction, so CE/D ≫ cap.
    vocab = 20
    emb = torch.ones(vocab, 4) + 0.05 * cost_matrix(vocab, 4)
    logits, labels = make_batch(3, 5, vocab, seed=4)
    capped = EmoObjective(cost_embedding=emb, mode=1, ratio_cap=3.0)
    out = capped(logits.float(), labels)
    assert out.metrics["weight"] == pytest.approx(3.0)
    ref = emo_ref(logits, labels, emb, mode=1, ratio_cap=3.0)
    assert rel_err(out.loss, ref) < 1e-5
    uncapped = EmoObjective(cost_embedding=emb, mode=1, ratio_cap=None)(logits.float(), labels)
    assert uncapped.metrics["weight"] > 10 and float(uncapped.loss) > float(out.loss)


def test_mode2_ratio_and_diagnostics():
    logits, labels = make_batch(4, 6, 50, seed=5)
    emb = cost_matrix(50)
    out = EmoObjective(cost_embedding=emb, mode=2)(logits.float(), labels)
    assert set(out.metrics) == {"ce", "demd", "ratio"}
    assert 0.0 < out.metrics["ratio"] <= 2.0  # D ≤ 2(1 − q_y) ≤ 2·CE
    z, y, _ = _flat_shifted(logits, labels)
    assert out.metrics["demd"] == pytest.approx(float(emo_demd_ref(z, y, emb).mean()), rel=1e-5)
    out1 = EmoObjective(cost_embedding=emb, mode=1)(logits.float(), labels)
    assert set(out1.metrics) == {"ce", "demd", "weight"}
    assert out1.metrics["demd"] == pytest.approx(out.metrics["demd"])


@pytest.mark.parametrize("mode", [1, 2])
def test_no_nan_when_prediction_is_certain_in_bf16(mode):
    # Logits peaked on the target: CE ≈ 0 and D ≈ 0, the regime where bf16 losses went NaN.
    vocab = 50
    _, labels = make_batch(2, 6, vocab, seed=6)
    targets = labels[:, 1:].clamp_min(0)
    logits = torch.zeros(2, 6, vocab)
    logits[:, :-1].scatter_(-1, targets.unsqueeze(-1), 40.0)
    obj = EmoObjective(cost_embedding=cost_matrix(vocab), mode=mode)
    loss, grad = value_and_grad(lambda z: obj(z, labels).loss, logits.bfloat16())
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all() and float(loss) >= 0.0


def test_cost_embedding_follows_logits_dtype_and_is_never_trained():
    emb = cost_matrix(7).requires_grad_(True)
    obj = get_objective("emo", cost_embedding=emb, mode=1)
    assert isinstance(obj, EmoObjective) and obj.options()["cost_embedding"] == "tensor"
    cost = obj.cost_embedding
    assert not cost.requires_grad and cost.dtype == torch.float32
    assert torch.allclose(cost.norm(dim=-1), torch.ones(7))
    logits, labels = make_batch(2, 4, 7)
    obj(logits.float().requires_grad_(True), labels).loss.backward()
    objective_loss(obj, logits, labels)  # float64 after float32: the cached copy follows
    assert emb.grad is None


# ---------------------------------------------------------------------- options and errors
@pytest.mark.parametrize(
    "options",
    [{"mode": 3}, {"mode": 1.5}, {"eps": 1e-8}, {"ratio_cap": 0.0}, {"ratio_cap": float("inf")},
     {"cost_embedding": torch.ones(7)}],
)
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        get_objective("emo", **options)


def test_unknown_option_is_rejected_by_name():
    with pytest.raises(ObjectiveError, match="ratio_capp"):
        get_objective("emo", ratio_capp=2.0)


def test_wrong_vocabulary_raises_clear_error():
    logits, labels = make_batch(2, 4, 7)
    with pytest.raises(ValueError, match="10 rows.*7"):
        EmoObjective(cost_embedding=cost_matrix(10))(logits.float(), labels)
    with pytest.raises(ValueError, match="49 rows.*50"):
        EmoObjective(cost_embedding=cost_matrix(49)).setup(tiny_gpt2())


def test_model_sources_need_setup():
    logits, labels = make_batch(2, 4, 50)
    for source in ("initial", "live"):
        with pytest.raises(RuntimeError, match="setup"):
            EmoObjective(cost_embedding=source)(logits.float(), labels)
    with pytest.raises(ValueError, match="no-such-dir"):
        EmoObjective(cost_embedding="/no-such-dir/model")(logits.float(), labels)


# ---------------------------------------------------------------------- sources, setup, resume
def _perturb_head(model):
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(torch.randn_like(model.get_output_embeddings().weight))


def test_initial_is_a_frozen_copy_of_the_starting_head():
    model = tiny_gpt2()
    obj = EmoObjective(cost_embedding="initial")
    obj.setup(model)
    head = model.get_output_embeddings().weight
    start = F.normalize(head.detach().float(), dim=-1)
    assert torch.allclose(obj.cost_embedding, start) and not obj.cost_embedding.requires_grad
    before = obj.cost_embedding.clone()
    _perturb_head(model)  # training moves the head; the cost embedding must not move
    obj.on_step_begin(model, 1)
    assert torch.equal(obj.cost_embedding, before)
    ids = torch.randint(0, 50, (2, 8))
    out = obj(model(input_ids=ids).logits, ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and head.grad is not None and obj.cost_embedding.grad is None


def test_initial_warns_on_a_fresh_model():
    obj = EmoObjective(cost_embedding="initial")
    obj.model_is_fresh = True
    with pytest.warns(UserWarning, match="randomly initialised"):
        obj.setup(tiny_gpt2())
    quiet = EmoObjective(cost_embedding="initial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.setup(tiny_gpt2())


def test_live_follows_the_current_head():
    model = tiny_gpt2()
    obj = EmoObjective(cost_embedding="live")
    obj.setup(model)
    head = model.get_output_embeddings().weight
    assert torch.allclose(obj.cost_embedding, F.normalize(head.detach(), dim=-1))
    _perturb_head(model)
    obj.on_step_begin(model, 1)
    assert torch.allclose(obj.cost_embedding, F.normalize(head.detach(), dim=-1))
    assert not obj.cost_embedding.requires_grad
    assert obj.state_dict() == {}  # restored from the model's own weights on resume


def test_state_dict_round_trip_restores_the_exact_matrix():
    model = tiny_gpt2()
    first = EmoObjective(cost_embedding="initial")
    first.setup(model)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # stored with the run, not in the model weights
    assert not any("cost" in k for k in model.state_dict())
    _perturb_head(model)  # the resumed run starts from a trained checkpoint
    resumed = EmoObjective(cost_embedding="initial")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.setup(model)  # must not overwrite the restored matrix
    assert torch.equal(resumed.cost_embedding, first.cost_embedding)
    logits, labels = make_batch(2, 5, 50)
    assert torch.equal(resumed(logits.float(), labels).loss, first(logits.float(), labels).loss)


def test_path_source_model_dir_and_tensor_file(tmp_path):
    other = tiny_gpt2(n_embd=8, seed=1)  # same vocabulary, different width
    other.save_pretrained(tmp_path / "other")
    expected = F.normalize(other.get_output_embeddings().weight.detach(), dim=-1)
    obj = EmoObjective(cost_embedding=str(tmp_path / "other"))
    obj.setup(tiny_gpt2(n_embd=16))
    assert obj.cost_embedding.shape == (50, 8) and torch.allclose(obj.cost_embedding, expected, atol=1e-6)
    assert set(obj.state_dict()) == {"cost_embedding"}

    torch.save(other.get_output_embeddings().weight.detach(), tmp_path / "head.pt")
    from_file = EmoObjective(cost_embedding=str(tmp_path / "head.pt"))  # no setup: loaded on first use
    logits, labels = make_batch(2, 5, 50)
    assert torch.equal(from_file(logits.float(), labels).loss, obj(logits.float(), labels).loss)

    tiny_gpt2(n_embd=8, vocab=49).save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(ValueError, match="49 rows.*50"):
        EmoObjective(cost_embedding=str(tmp_path / "small-vocab")).setup(tiny_gpt2())


# ---------------------------------------------------------------------- reduction paths
@pytest.mark.parametrize("mode", [1, 2])
def test_gradient_accumulation_equivalence(mode):
    logits, labels = make_batch(4, 7, 50, seed=8)
    obj = EmoObjective(cost_embedding=cost_matrix(50), mode=mode)
    big, micro, big_grad, micro_grad = grad_accumulation_check(obj, logits, labels)
    assert abs(float(big) - float(micro)) < 1e-5
    assert float((big_grad - micro_grad).abs().max()) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", [1, 2])
def test_chunked_path_matches_full_logits(tied, with_bias, mode):
    obj = EmoObjective(cost_embedding=cost_matrix(23), mode=mode)
    assert_chunked_matches(obj, 23, tied, with_bias)


def test_empty_batch_is_a_differentiable_zero():
    assert_empty_batch_is_zero(EmoObjective(cost_embedding=cost_matrix(11)))


@pytest.mark.parametrize("source", ["initial", "live"])
@pytest.mark.parametrize("mode", [1, 2])
def test_bf16_model_gives_finite_loss_and_gradients(source, mode):
    obj = EmoObjective(cost_embedding=source, mode=mode)
    model = assert_bf16_model_finite(obj)
    assert obj.cost_embedding.dtype == torch.float32  # Ê stays fp32 with a bf16 head
    head = model.get_output_embeddings().weight
    assert torch.allclose(obj.cost_embedding, F.normalize(head.detach().float(), dim=-1))


def test_mode2_is_uncapped_mode1_reweighted_per_token():
    """Mode 2's per-token gradient is uncapped mode 1's times 2·D_i/CE_i (same direction per token):
    ∇[sg(D/CE)·CE + D] = (D/CE)·∇CE + ∇D = (2D/CE)·∇(½[CE + sg(CE/D)·D]).  So mode 2 has no cap on
    the transport term's weight relative to CE (CE/D, ~8 on a shifted domain), which is why it
    behaves like uncapped mode 1 when CE is large (docs/calibration.md)."""
    vocab, n = 50, 12
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, n + 1, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (1, n + 1), generator=g)
    emb = cost_matrix(vocab).double()
    grads = {}
    for mode in (1, 2):
        obj = get_objective("emo", cost_embedding=emb, mode=mode, ratio_cap=None)  # eps 1e-6
        per_token = []
        for i in range(n):  # one target at a time: each row's gradient on its own
            z = logits.clone().requires_grad_(True)
            lab = torch.full_like(labels, -100)
            lab[0, i + 1] = labels[0, i + 1]
            obj(z, lab).loss.backward()
            per_token.append(z.grad[0, i].clone())
        grads[mode] = torch.stack(per_token)
    q = logits[0, :n].softmax(-1)
    y = labels[0, 1:]
    ce = -q.log().gather(-1, y[:, None])[:, 0]
    e = F.normalize(emb, dim=-1)
    demd = 1 - ((q @ e) * e[y]).sum(-1)
    scale = 2 * demd / ce
    torch.testing.assert_close(grads[2], scale[:, None] * grads[1], rtol=1e-4, atol=1e-9)  # up to the ε's
    assert (ce / demd).min() > 1  # the D term outweighs CE in every token here, in both modes
