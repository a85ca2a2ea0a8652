"""Numerical safety: every objective trains under bf16 autocast (CPU here; bf16/fp16 on a GPU are
checked with the commands in docs/distributed.md), and a non-finite loss either stops the run with
a message naming step, objective and term, or (``on_nonfinite="skip"``) drops the micro-batch and
is counted in the logs as ``skipped_batches``."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import TrainingArguments

from emo_trainer.cli import main
from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives import available, get_objective
from emo_trainer.objectives.emo import EmoObjective
from emo_trainer.objectives.sequencematch.backspace import add_backspace_token
from emo_trainer.trainer import NonFiniteLossError, ObjectiveTrainer

BF16_STEPS = 20

# Options chosen to exercise each objective's fragile part in low precision: EMO's ratio CE/D
# (D ≈ 0 is the known NaN), MiLe's entropy weight, SequenceMatch's V/r terms with sampling.
OBJECTIVES = {
    "mle": {},
    "emo": {"cost_embedding": "live", "mode": 1, "ratio_cap": None},
    "mixce": {"eta": 0.1},
    "mile": {"gamma": 1.0},
    "sequencematch": {"sample_every": 5, "noise_rate": 0.1, "max_new_tokens": 6, "prefix_tokens": 4, "buffer_size": 16},
}


def _rows(n=32, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(1, vocab, (int(L),), generator=g).tolist()
                       for L in torch.randint(6, 17, (n,), generator=g)]}
    )


def _args(tmp_path, name, steps, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, **kw,
    )


@pytest.mark.parametrize("name", [n for n in OBJECTIVES if n in available()])
def test_bf16_autocast_training_stays_finite(tmp_path, tiny_tokenizer, name):
    objective = get_objective(name, **OBJECTIVES[name])
    model = make_tiny_gpt2(vocab_size=len(tiny_tokenizer), n_layer=2)
    if objective.name == "sequencematch":
        add_backspace_token(model, tiny_tokenizer)
    args = _args(tmp_path, name, BF16_STEPS, bf16=True)
    trainer = ObjectiveTrainer(
        model=model, args=args, objective=objective, train_dataset=_rows(vocab=len(tiny_tokenizer)),
        data_collator=CausalLMCollator(tiny_tokenizer.pad_token_id), processing_class=tiny_tokenizer,
    )
    assert trainer.accelerator.mixed_precision == "bf16"  # autocast on, weights stay fp32
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == BF16_STEPS
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]), h
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
        assert "skipped_batches" not in h
    if objective.name == "emo":
        assert all(h["demd"] >= 0 for h in logs)  # the negative-D pitfall
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert logs[-1]["ce"] < logs[0]["ce"]  # and it learned something


class _PoisonedEmo(EmoObjective):
    """EMO whose transport term D becomes +inf on one micro-batch (call ``poison_call``)."""

    def __init__(self, poison_call: int, **kw):
        super().__init__(**kw)
        self.poison_call, self.calls = poison_call, 0

    def token_stats(self, logits, targets, extras=None):
        stats = super().token_stats(logits, targets, extras)
        self.calls += 1
        if self.calls == self.poison_call:
            stats["demd"] = stats["demd"] + float("inf")
        return stats


def _poisoned_trainer(tmp_path, on_nonfinite, steps=6, poison_call=3):
    model = make_tiny_gpt2()
    objective = _PoisonedEmo(poison_call, cost_embedding="live")
    trainer = ObjectiveTrainer(
        model=model, args=_args(tmp_path, on_nonfinite, steps), objective=objective, on_nonfinite=on_nonfinite,
        train_dataset=_rows(), data_collator=CausalLMCollator(0),
    )
    return trainer, model


def test_nonfinite_loss_stops_with_step_objective_and_term(tmp_path):
    trainer, _ = _poisoned_trainer(tmp_path, "raise")
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    # the third micro-batch is optimizer step 3, i.e. global_step 2 when it is computed
    assert "step 2" in msg and "objective 'emo'" in msg and "demd" in msg, msg
    assert "on_nonfinite: skip" in msg  # says how to keep going instead


def test_nonfinite_loss_skip_mode_counts_and_continues(tmp_path):
    trainer, model = _poisoned_trainer(tmp_path, "skip", steps=6)
    trainer.train()
    assert trainer.state.global_step == 6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h.get("skipped_batches", 0) for h in logs] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_mode_stops_a_diverged_run(tmp_path):
    """Every micro-batch non-finite from the 3rd on (a diverged model, not a bad batch): skip mode
    stops after MIN_CONSECUTIVE_SKIPS of them in a row instead of 'training' to the end."""
    from emo_trainer.trainer import MIN_CONSECUTIVE_SKIPS

    class Diverged(_PoisonedEmo):
        def token_stats(self, logits, targets, extras=None):
            stats = super().token_stats(logits, targets, extras)
            if self.calls >= self.poison_call:
                stats["demd"] = stats["demd"] + float("inf")
            return stats

    steps = MIN_CONSECUTIVE_SKIPS + 6
    trainer = ObjectiveTrainer(
        model=make_tiny_gpt2(), args=_args(tmp_path, "skip", steps), objective=Diverged(3, cost_embedding="live"),
        on_nonfinite="skip", train_dataset=_rows(), data_collator=CausalLMCollator(0),
    )
    with pytest.raises(NonFiniteLossError, match=f"{MIN_CONSECUTIVE_SKIPS} micro-batches in a row .* has diverged"):
        trainer.train()
    assert trainer.state.global_step == 2 + MIN_CONSECUTIVE_SKIPS - 1  # stopped there, not at the end
    assert trainer._skipped_batches == MIN_CONSECUTIVE_SKIPS


def test_cli_nonfinite_is_one_error_line(tmp_path, capsys, monkeypatch):
    from emo_trainer.objectives import mixce

    calls = {"n": 0}
    original = mixce.MixceObjective.combine

    def combine(self, stats, valid, extras=None):
        loss_sum, metrics = original(self, stats, valid, extras)
        calls["n"] += 1
        if calls["n"] == 2:
            metrics["weight"] = torch.tensor(float("nan"))
            loss_sum = loss_sum * float("nan")
        return loss_sum, metrics

    monkeypatch.setattr(mixce.MixceObjective, "combine", combine)
    rc = main([
        "--config", str(Path(__file__).resolve().parents[1] / "configs/quickstart.yaml"), "--objective", "mixce", "--output_dir", str(tmp_path / "run"),
        "--max_steps", "4", "--save_strategy", "no", "--eval_strategy", "no", "--eval.generation", "false",
        "--data.max_train_samples", "100", "--data.max_eval_samples", "10", "--data.block_size", "32",
        "--model.config", "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: non-finite loss at step 1, objective 'mixce'") and "weight" in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------- masked logits
@pytest.mark.parametrize("name", ["mle", "mixce", "mile", "emo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_infinity_logits_are_masked_columns_not_nan(name, dtype):
    """A −∞ logit (a column masked by the model or a logits processor) has q = 0: 0·log 0 = 0 in
    MiLe's entropy and EMO's transport, no gradient there.  Reference: float64 on the same logits
    with −∞ replaced by −1e4, whose probability is exactly 0 in float64 too."""
    from reference_losses import emo_ref, make_batch, mile_ref, mixce_ref, mle_ref, value_and_grad

    vocab = 23
    logits, labels = make_batch(3, 6, vocab, seed=5)
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[[1, 7, 19]] = True
    labels = labels.masked_fill(masked[labels.clamp_min(0)] & (labels >= 0), 4)  # no gold in a masked column
    logits = logits.to(dtype).masked_fill(masked, float("-inf"))
    ref_logits = logits.double().masked_fill(masked, -1e4)
    cost = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    objective = get_objective(name, **({"cost_embedding": cost.float()} if name == "emo" else {}))
    refs = {"mle": mle_ref, "mixce": mixce_ref, "mile": mile_ref, "emo": lambda z, y: emo_ref(z, y, cost)}
    loss, grad = value_and_grad(lambda z: objective(z, labels).loss, logits)
    ref, ref_grad = value_and_grad(lambda z: refs[name](z, labels), ref_logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float(loss) == pytest.approx(float(ref), rel=tol)
    assert (grad[..., masked] == 0).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()))


@pytest.mark.parametrize("scale", [0.5, 1.5, -3.0, 1e6])
def test_entropy_gradient_with_minus_infinity_logits_any_incoming_gradient(scale):
    """softmax_stats' differentiable entropy: a −∞ column gets gradient 0 whatever multiplies H
    (a floor of finfo.min overflowed to inf once scaled by |g_H| > 1, and 0·inf = nan)."""
    from emo_trainer.ops.fused import softmax_stats

    z = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[:, 3] = float("-inf")
    y = torch.tensor([0, 1, 2, 4])
    leaf = z.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(scale * softmax_stats(leaf, y, entropy=True)["entropy"].sum(), leaf)
    ref_leaf = z.masked_fill(torch.isinf(z), -1e4).requires_grad_(True)  # q = 0 exactly in float64 too
    logq = torch.log_softmax(ref_leaf, -1)
    (ref,) = torch.autograd.grad(scale * -(logq.exp() * logq).sum(), ref_leaf)
    assert torch.isfinite(grad).all() and (grad[:, 3] == 0).all()
    torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5 * abs(scale))
