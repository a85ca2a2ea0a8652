"""DFT (``dft``): float64 reference, = MixCE η = 0, diagnostics, −∞ columns, both loss paths
through ObjectiveTrainer, gradient accumulation, bf16."""

from __future__ import annotations

import pytest
import torch
from ecosystem_checks import (
    DTYPES,
    check_gradient_accumulation,
    check_masked_columns,
    check_objective_against_reference,
    check_trainer_matches_reference,
)
from reference_losses import (
    assert_bf16_model_finite,
    assert_chunked_matches,
    assert_empty_batch_is_zero,
    dft_ref,
    make_batch,
    value_and_grad,
)

from emo_trainer.objectives import ObjectiveError, get_objective
from emo_trainer.objectives.dft import DftObjective


@pytest.mark.parametrize("vocab", (7, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(vocab, dtype):
    check_objective_against_reference(get_objective("dft"), dft_ref, vocab, dtype, seed=vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_is_exactly_mixce_with_eta_zero(dtype):
    logits, labels = make_batch(4, 6, 50, seed=2)
    logits = logits.to(dtype)
    dft, mixce = get_objective("dft"), get_objective("mixce", eta=0.0)
    for num_items in (None, 40):
        loss, grad = value_and_grad(lambda z, n=num_items: dft(z, labels, n).loss, logits)
        ref, ref_grad = value_and_grad(lambda z, n=num_items: mixce(z, labels, n).loss, logits)
        assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_no_options_and_diagnostics():
    obj = get_objective("dft")
    assert isinstance(obj, DftObjective) and obj.options() == {}
    with pytest.raises(ObjectiveError, match="no|options"):
        get_objective("dft", eta=0.1)
    logits, labels = make_batch(3, 5, 20, seed=1)
    out = obj(logits.float(), labels)
    assert set(out.metrics) == {"ce", "weight"}
    mle = get_objective("mle")(logits.float(), labels)
    assert out.metrics["ce"] == pytest.approx(float(mle.loss), rel=1e-6)  # plain CE, next to the loss
    assert out.metrics["weight"] < 1 and float(out.loss) < out.metrics["ce"]


def test_masked_columns():
    check_masked_columns(get_objective("dft"), dft_ref)


def test_trainer_full_and_chunked_paths_match_float64(tmp_path):
    check_trainer_matches_reference(tmp_path, "dft", {}, dft_ref)


@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_gradient_accumulation_equals_big_batch(tmp_path, loss_path):
    check_gradient_accumulation(tmp_path, "dft", {}, loss_path)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_path_matches_full_logits(tied):
    assert_chunked_matches(get_objective("dft"), 23, tied, with_bias=True)


def test_empty_batch_and_bf16_model():
    assert_empty_batch_is_zero(get_objective("dft"))
    assert_bf16_model_finite(get_objective("dft"))
