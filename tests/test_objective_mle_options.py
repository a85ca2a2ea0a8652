"""``mle``'s options ``label_smoothing`` (ε) and ``z_loss`` (β): float64 reference, PyTorch's
label-smoothing semantics, both 0 bit-identical to plain MLE, −∞ columns, both loss paths through
ObjectiveTrainer, gradient accumulation, bf16, nothing new of N×V kept for backward."""

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
    mle_options_ref,
    num_targets,
    value_and_grad,
)

from emo_trainer.objectives import get_objective, shift_labels
from emo_trainer.ops.fused import softmax_stats

OPTIONS = [{"label_smoothing": 0.1, "z_loss": 0.0}, {"label_smoothing": 0.0, "z_loss": 1e-2},
           {"label_smoothing": 0.3, "z_loss": 1e-3}]
IDS = ["smoothing", "z_loss", "both"]


@pytest.mark.parametrize("vocab", (7, 257))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_matches_float64_reference(vocab, dtype, options):
    check_objective_against_reference(get_objective("mle", **options), partial(mle_options_ref, **options), vocab,
                                      dtype, seed=vocab)


def test_label_smoothing_is_pytorchs_and_z_loss_is_liger_lse_square():
    logits, labels = make_batch(3, 6, 30, seed=5)
    logits = logits.float()
    targets = shift_labels(labels).reshape(-1)
    flat = logits.reshape(-1, 30)
    for eps in (0.1, 1.0):
        ours = get_objective("mle", label_smoothing=eps)(logits, labels).loss
        ref = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100, label_smoothing=eps)
        assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    valid = targets != -100
    lse = torch.logsumexp(flat[valid], -1)
    ours = get_objective("mle", z_loss=1e-4)(logits, labels).loss
    ce = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100)
    assert float(ours) == pytest.approx(float(ce + 1e-4 * lse.square().mean()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_options_are_bit_identical_to_plain_mle(dtype):
    """The ε = β = 0 defaults run the code of before the options: CE of the fused statistics,
    summed over valid positions (what MLE was), bit for bit."""
    logits, labels = make_batch(4, 6, 50, seed=2)
    logits = logits.to(dtype)
    targets = shift_labels(labels).reshape(-1)
    valid = targets != -100

    def before_options(z, num_items):
        ce = softmax_stats(z.reshape(-1, 50), targets.masked_fill(~valid, 0))["ce"]
        loss_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
        return loss_sum / (num_items if num_items is not None else int(valid.sum()))

    explicit = get_objective("mle", label_smoothing=0.0, z_loss=0.0)
    default = get_objective("mle")
    assert default.options() == {"label_smoothing": 0.0, "z_loss": 0.0}
    for num_items in (None, 40):
        ref, ref_grad = value_and_grad(lambda z, n=num_items: before_options(z, n), logits)
        for obj in (explicit, default):
            loss, grad = value_and_grad(lambda z, n=num_items, f=obj: f(z, labels, n).loss, logits)
            assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
        assert set(explicit(logits, labels).metrics) == {"ce"}


def test_diagnostics():
    logits, labels = make_batch(3, 5, 20, seed=1)
    out = get_objective("mle", label_smoothing=0.1, z_loss=1e-3)(logits.float(), labels)
    assert set(out.metrics) == {"ce", "smooth_ce", "lse", "z_loss"}
    plain = get_objective("mle")(logits.float(), labels)
    assert out.metrics["ce"] == pytest.approx(float(plain.loss), rel=1e-6)
    assert float(out.loss) == pytest.approx(0.9 * out.metrics["ce"] + 0.1 * out.metrics["smooth_ce"] + out.metrics["z_loss"],
                                            rel=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"label_smoothing": -0.1}, "label_smoothing must be in"), ({"label_smoothing": 1.5}, "label_smoothing must be in"),
    ({"z_loss": -1e-4}, "z_loss must be a number ≥ 0"), ({"z_loss": float("nan")}, "z_loss"),
])
def test_bad_options_raise(options, match):
    assert_option_error("mle", match, **options)


def test_masked_columns_are_left_out_of_the_smoothing_mean():
    opts = {"label_smoothing": 0.2, "z_loss": 1e-2}
    check_masked_columns(get_objective("mle", **opts), partial(mle_options_ref, **opts))


@pytest.mark.parametrize("options", OPTIONS[1:], ids=IDS[1:])
def test_trainer_full_and_chunked_paths_match_float64(tmp_path, options):
    check_trainer_matches_reference(tmp_path, "mle", options, partial(mle_options_ref, **options))


@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_gradient_accumulation_equals_big_batch(tmp_path, loss_path):
    check_gradient_accumulation(tmp_path, "mle", OPTIONS[2], loss_path)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_chunked_path_matches_full_logits(options):
    assert_chunked_matches(get_objective("mle", **options), 23, tied=True, with_bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_the_logits_are_kept_for_backward(dtype):
    """lse comes from the fused pass and the smoothing mean from its own blocked Function: autograd
    keeps the logits (in their own dtype) and nothing else of N×V size."""
    saved = []
    z = torch.randn(40, 64, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 64, (2, 20))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = get_objective("mle", **OPTIONS[2])(z.view(2, 20, 64), labels, num_targets(labels))
        out.loss.backward()
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= 40 * 64}
    assert big == {z.untyped_storage().data_ptr()}
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()


def test_empty_batch_and_bf16_model():
    assert_empty_batch_is_zero(get_objective("mle", **OPTIONS[2]))
    assert_bf16_model_finite(get_objective("mle", **OPTIONS[2]))
