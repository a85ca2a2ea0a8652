"""Focal loss (``focal``) with MiLe's step normaliser α: float64 reference, γ = 0 is MLE, α over
the whole optimizer step (gradient accumulation = big batch) and over ranks (2 = 1 with the
doubled batch), options, −∞ columns, both loss paths through ObjectiveTrainer, bf16."""

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
    focal_ref,
    focal_weights_ref,
    make_batch,
    num_targets,
    rel_err,
    value_and_grad,
)

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.focal import FocalObjective
from emo_trainer.objectives.mile import MileObjective


@pytest.mark.parametrize("vocab", (7, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_matches_float64_reference(vocab, dtype, gamma):
    check_objective_against_reference(get_objective("focal", gamma=gamma), partial(focal_ref, gamma=gamma), vocab,
                                      dtype, seed=vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gamma_zero_is_exactly_mle(dtype):
    logits, labels = make_batch(4, 6, 50, seed=2)
    logits = logits.to(dtype)
    focal, mle = get_objective("focal", gamma=0.0), get_objective("mle")
    for num_items in (None, 40):
        loss, grad = value_and_grad(lambda z, n=num_items: focal(z, labels, n).loss, logits)
        ref, ref_grad = value_and_grad(lambda z, n=num_items: mle(z, labels, n).loss, logits)
        assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_defaults_diagnostics_and_shared_machinery():
    obj = get_objective("focal")
    assert isinstance(obj, FocalObjective) and obj.options() == {"gamma": 1.0}
    assert isinstance(obj, MileObjective) and obj.step_scale_name == "alpha"  # MiLe's step-α machinery
    logits, labels = make_batch(3, 5, 20, seed=1)
    out = obj(logits.float(), labels)
    assert set(out.metrics) == {"ce", "q_gold", "weight", "alpha"}
    w = focal_weights_ref(logits, labels, 1.0)
    assert out.metrics["weight"] == pytest.approx(float(w.mean()), rel=1e-5)
    assert out.metrics["q_gold"] == pytest.approx(1.0 - float(w.mean()), rel=1e-5)  # γ = 1: w = 1 − q_y
    assert out.metrics["alpha"] == pytest.approx(len(w) / float(w.sum()), rel=1e-5)


@pytest.mark.parametrize("gamma", [-0.5, float("nan"), float("inf")])
def test_bad_gamma_raises(gamma):
    assert_option_error("focal", "focal gamma must be a number ≥ 0", gamma=gamma)


def test_all_weights_zero_gives_a_zero_loss_not_nan():
    """q_y = 1 exactly at every valid position (every other column −∞): Σw = 0, α = 1, loss 0."""
    logits = torch.full((2, 4, 6), float("-inf"))
    labels = torch.randint(0, 6, (2, 4))
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    logits.scatter_(2, targets.clamp_min(0).unsqueeze(-1), 0.0)
    logits[:, -1] = 0.0  # the last position has no target: a finite row
    logits.requires_grad_(True)
    out = get_objective("focal", gamma=2.0)(logits, labels, 100)
    assert float(out.loss.detach()) == 0.0 and out.metrics["alpha"] == 1.0
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    obj = get_objective("focal")
    obj.defer_step_scale = True
    obj(logits.detach(), labels)
    assert float(obj.take_step_scale()) == 1.0


def test_masked_columns():
    check_masked_columns(get_objective("focal", gamma=2.0), partial(focal_ref, gamma=2.0))


def test_two_ranks_equal_one_process_with_the_doubled_batch(monkeypatch):
    """(n_valid, Σw) are summed over ranks before α is formed (simulated all-reduce; the real
    2-process run is tests/test_distributed.py's ``focal`` case)."""
    logits, labels = make_batch(4, 7, 50, seed=9)
    n_items = num_targets(labels)
    halves = [slice(0, 2), slice(2, 4)]
    totals = []
    for sl in halves:
        w = focal_weights_ref(logits[sl], labels[sl], 2.0)
        totals.append(torch.tensor([float(len(w)), float(w.sum())]))
    rank = {"now": 0}

    def fake_all_reduce(t, op=None):
        t += totals[1 - rank["now"]].to(t.dtype)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    obj = get_objective("focal", gamma=2.0)
    obj.average_tokens_across_devices = True
    losses, grads = [], []
    for r, sl in enumerate(halves):
        rank["now"] = r
        loss, grad = value_and_grad(lambda z, sl=sl: obj(z, labels[sl], n_items).loss, logits[sl].float())
        losses.append(loss)
        grads.append(grad)
    monkeypatch.undo()
    ref, ref_grad = value_and_grad(lambda z: focal_ref(z, labels, 2.0), logits)
    assert rel_err(sum(losses) / 2, ref) < 1e-5
    assert rel_err(torch.cat(grads) / 2, ref_grad) < 1e-5


def test_trainer_full_and_chunked_paths_match_float64(tmp_path):
    check_trainer_matches_reference(tmp_path, "focal", {"gamma": 2.0}, partial(focal_ref, gamma=2.0))


@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_gradient_accumulation_equals_big_batch_with_the_step_alpha(tmp_path, loss_path):
    big_log, acc_log = check_gradient_accumulation(tmp_path, "focal", {"gamma": 2.0}, loss_path)
    assert acc_log["alpha"] == pytest.approx(big_log["alpha"], rel=1e-6) and big_log["alpha"] != 1.0


def test_chunked_path_matches_full_logits():
    assert_chunked_matches(get_objective("focal", gamma=2.0), 23, tied=True, with_bias=True)


def test_empty_batch_and_bf16_model():
    assert_empty_batch_is_zero(get_objective("focal"))
    assert_bf16_model_finite(get_objective("focal"))
