"""MixCE objective: float64 reference, η = 1 is MLE, options, reduction paths."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from reference_losses import (
    assert_bf16_model_finite,
    assert_chunked_matches,
    assert_empty_batch_is_zero,
    check_against_reference,
    grad_accumulation_check,
    make_batch,
    mixce_ref,
    num_targets,
    value_and_grad,
)

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.mixce import MixceObjective

VOCABS = (7, 50, 257)
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eta", [0.0, 0.1, 0.7])
def test_matches_float64_reference(vocab, dtype, eta):
    logits, labels = make_batch(4, 6, vocab, seed=vocab)
    obj = get_objective("mixce", eta=eta)
    for num_items in (None, num_targets(labels) + 5):
        check_against_reference(obj, partial(mixce_ref, eta=eta), logits, labels, dtype, num_items)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_items", [None, 40])
def test_eta_one_is_exactly_mle(dtype, num_items):
    logits, labels = make_batch(4, 6, 50, seed=2)
    logits = logits.to(dtype)
    mixce, mle = get_objective("mixce", eta=1.0), get_objective("mle")
    loss, grad = value_and_grad(lambda z: mixce(z, labels, num_items).loss, logits)
    ref, ref_grad = value_and_grad(lambda z: mle(z, labels, num_items).loss, logits)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_default_and_diagnostics():
    obj = get_objective("mixce")
    assert isinstance(obj, MixceObjective) and obj.options() == {"eta": 0.1}
    logits, labels = make_batch(3, 5, 20, seed=1)
    out = obj(logits.float(), labels)
    assert set(out.metrics) == {"ce", "weight", "q_gold"}
    # weight = η + (1 − η)·q_gold, averaged over valid tokens: linear, so the means agree too.
    assert out.metrics["weight"] == pytest.approx(0.1 + 0.9 * out.metrics["q_gold"], rel=1e-6)


@pytest.mark.parametrize("eta", [-0.1, 1.1, float("nan"), float("inf")])
def test_eta_out_of_range_raises(eta):
    with pytest.raises(ValueError, match="eta"):
        get_objective("mixce", eta=eta)


def test_gradient_accumulation_equivalence():
    logits, labels = make_batch(4, 7, 50, seed=8)
    big, micro, big_grad, micro_grad = grad_accumulation_check(get_objective("mixce", eta=0.3), logits, labels)
    assert abs(float(big) - float(micro)) < 1e-5
    assert float((big_grad - micro_grad).abs().max()) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_path_matches_full_logits(tied, with_bias):
    assert_chunked_matches(get_objective("mixce", eta=0.3), 23, tied, with_bias)


def test_empty_batch_is_a_differentiable_zero():
    assert_empty_batch_is_zero(get_objective("mixce"))


def test_bf16_model_gives_finite_loss_and_gradients():
    assert_bf16_model_finite(get_objective("mixce"))
