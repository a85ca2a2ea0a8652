"""EAFT (``eaft``): top-k entropy against a full sort, float64 reference, α = 0 is MLE, options
(axolotl's normaliser), −∞ columns, both loss paths through ObjectiveTrainer, gradient
accumulation, bf16, nothing of N×V kept by the top-k."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from ecosystem_checks import (
    DTYPES,
    assert_option_error,
    check_gradient_accumulation,
    check_masked_columns,
    check_objective_against_reference,
    check_trainer_matches_reference,
)
from reference_losses import (
    assert_bf16_model_finite,
    assert_chunked_matches,
    assert_empty_batch_is_zero,
    eaft_ref,
    make_batch,
    topk_entropy_ref,
    value_and_grad,
)

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.eaft import EaftObjective, topk_entropy

OPTIONS = [{"alpha": 1.0, "top_k": 20, "normalizer": 3.0}, {"alpha": 0.5, "top_k": 5, "normalizer": 1.0}]


@pytest.mark.parametrize("k", [1, 3, 20, 300])
@pytest.mark.parametrize("block_rows", [1, 1000])
def test_topk_entropy_against_a_full_sort(k, block_rows):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(9, 50, generator=g, dtype=torch.float64) * 3
    z[2, :45] = float("-inf")  # fewer finite columns than k
    got = topk_entropy(z, k, block_elements=block_rows * 50)
    assert got.dtype == torch.float64 and not got.requires_grad
    assert torch.allclose(got, topk_entropy_ref(z, k), rtol=1e-12, atol=1e-12)
    if k == 1:
        assert float(got.abs().max()) == 0.0
    got32 = topk_entropy(z.float(), k)
    bf = topk_entropy(z.bfloat16(), k)
    assert got32.dtype == bf.dtype == torch.float32
    assert torch.allclose(got32.double(), topk_entropy_ref(z, k), atol=1e-5)
    assert torch.allclose(bf.double(), topk_entropy_ref(z.bfloat16().double(), k), atol=1e-5)  # exact values, fp32 math


@pytest.mark.parametrize("vocab", (7, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "axolotl-like"])
def test_matches_float64_reference(vocab, dtype, options):
    check_objective_against_reference(get_objective("eaft", **options), partial(eaft_ref, **options), vocab, dtype,
                                      seed=vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alpha_zero_is_exactly_mle(dtype):
    logits, labels = make_batch(4, 6, 50, seed=2)
    logits = logits.to(dtype)
    eaft, mle = get_objective("eaft", alpha=0.0), get_objective("mle")
    for num_items in (None, 40):
        loss, grad = value_and_grad(lambda z, n=num_items: eaft(z, labels, n).loss, logits)
        ref, ref_grad = value_and_grad(lambda z, n=num_items: mle(z, labels, n).loss, logits)
        assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_defaults_and_diagnostics():
    obj = get_objective("eaft")
    assert isinstance(obj, EaftObjective) and obj.options() == {"alpha": 1.0, "top_k": 20, "normalizer": 3.0}
    logits, labels = make_batch(3, 5, 40, seed=1)
    out = obj(logits.float(), labels)
    assert set(out.metrics) == {"ce", "weight", "topk_entropy"}
    assert out.metrics["weight"] == pytest.approx(out.metrics["topk_entropy"] / 3.0, rel=1e-5)  # α = 1: linear
    # the normaliser only rescales the weight: c = 1 (axolotl) gives 3× the loss of c = 3
    axolotl = get_objective("eaft", normalizer=1.0)(logits.float(), labels)
    assert float(axolotl.loss) == pytest.approx(3.0 * float(out.loss), rel=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"alpha": -1.0}, "alpha must be"), ({"top_k": 0}, "top_k must be an integer ≥ 1"), ({"top_k": 2.5}, "top_k"),
    ({"normalizer": 0.0}, "normalizer must be"), ({"normalizer": float("inf")}, "normalizer"),
])
def test_bad_options_raise(options, match):
    assert_option_error("eaft", match, **options)


def test_masked_columns():
    opts = {"alpha": 1.0, "top_k": 12, "normalizer": 3.0}  # k = 12 of 13 columns: the top k reaches a −∞ column
    check_masked_columns(get_objective("eaft", **opts), partial(eaft_ref, **opts))


def test_trainer_full_and_chunked_paths_match_float64(tmp_path):
    check_trainer_matches_reference(tmp_path, "eaft", OPTIONS[0], partial(eaft_ref, **OPTIONS[0]))


@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_gradient_accumulation_equals_big_batch(tmp_path, loss_path):
    check_gradient_accumulation(tmp_path, "eaft", OPTIONS[1], loss_path)


def test_chunked_path_matches_full_logits():
    assert_chunked_matches(get_objective("eaft", **OPTIONS[1]), 23, tied=True, with_bias=True)


def test_top_k_keeps_nothing_for_backward():
    """The top-k runs without gradient: autograd keeps the logits and nothing else of N×V."""
    saved = []
    z = torch.randn(40, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 20))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = get_objective("eaft")(z.view(2, 20, 64), labels)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= 40 * 64}
    assert big == {z.untyped_storage().data_ptr()}
    out.loss.backward()
    assert torch.isfinite(z.grad).all()


def test_empty_batch_and_bf16_model():
    assert_empty_batch_is_zero(get_objective("eaft"))
    assert_bf16_model_finite(get_objective("eaft"))
