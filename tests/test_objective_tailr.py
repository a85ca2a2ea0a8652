"""TaiLr (``tailr``): float64 reference, γ = 0 is MLE, γ = 1 is DFT with the floor, options,
−∞ columns, both loss paths through ObjectiveTrainer, gradient accumulation, bf16."""

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
    make_batch,
    tailr_ref,
    value_and_grad,
)

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.tailr import TailrObjective

# γ = 0.3 with floor 0.05 puts weights on both sides of the clamp for these random logits
OPTIONS = [{"gamma": 1e-7, "min_weight": 0.2}, {"gamma": 0.3, "min_weight": 0.05}]


@pytest.mark.parametrize("vocab", (7, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "gamma0.3"])
def test_matches_float64_reference(vocab, dtype, options):
    check_objective_against_reference(get_objective("tailr", **options), partial(tailr_ref, **options), vocab, dtype,
                                      seed=vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gamma_zero_is_exactly_mle(dtype):
    logits, labels = make_batch(4, 6, 50, seed=2, scale=30.0)  # scale 30: some q_y underflow to 0 (0/0 stays 1)
    logits = logits.to(dtype)
    tailr, mle = get_objective("tailr", gamma=0.0, min_weight=0.2), get_objective("mle")
    for num_items in (None, 40):
        loss, grad = value_and_grad(lambda z, n=num_items: tailr(z, labels, n).loss, logits)
        ref, ref_grad = value_and_grad(lambda z, n=num_items: mle(z, labels, n).loss, logits)
        assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_gamma_one_is_dft_with_the_floor():
    logits, labels = make_batch(4, 6, 50, seed=4)
    logits = logits.float()
    out = get_objective("tailr", gamma=1.0, min_weight=0.0)(logits, labels)
    dft = get_objective("dft")(logits, labels)
    assert float(out.loss) == pytest.approx(float(dft.loss), rel=1e-6)
    floored = get_objective("tailr", gamma=1.0, min_weight=0.2)(logits, labels)
    assert floored.metrics["weight"] >= 0.2 and float(floored.loss) > float(dft.loss)


def test_defaults_and_diagnostics():
    obj = get_objective("tailr")
    assert isinstance(obj, TailrObjective) and obj.options() == {"gamma": 1e-7, "min_weight": 0.2}
    logits, labels = make_batch(3, 5, 20, seed=1)
    out = obj(logits.float(), labels)
    assert set(out.metrics) == {"ce", "weight", "q_gold"}
    assert 0.2 <= out.metrics["weight"] <= 1.0


@pytest.mark.parametrize("options,match", [
    ({"gamma": -0.1}, "gamma must be in"), ({"gamma": 1.5}, "gamma must be in"), ({"gamma": float("nan")}, "gamma"),
    ({"min_weight": -0.1}, "min_weight must be in"), ({"min_weight": 1.2}, "min_weight must be in"),
])
def test_bad_options_raise(options, match):
    assert_option_error("tailr", match, **options)


def test_masked_columns():
    check_masked_columns(get_objective("tailr", gamma=0.3, min_weight=0.05), partial(tailr_ref, gamma=0.3, min_weight=0.05))


def test_trainer_full_and_chunked_paths_match_float64(tmp_path):
    check_trainer_matches_reference(tmp_path, "tailr", OPTIONS[1], partial(tailr_ref, **OPTIONS[1]))


@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_gradient_accumulation_equals_big_batch(tmp_path, loss_path):
    check_gradient_accumulation(tmp_path, "tailr", OPTIONS[1], loss_path)


def test_chunked_path_matches_full_logits():
    assert_chunked_matches(get_objective("tailr", **OPTIONS[1]), 23, tied=True, with_bias=True)


def test_empty_batch_and_bf16_model():
    assert_empty_batch_is_zero(get_objective("tailr"))
    assert_bf16_model_finite(get_objective("tailr"))
