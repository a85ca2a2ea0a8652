"""ObjectiveTrainer: MLE equals the built-in loss; gradient accumulation equals a bigger batch."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import TrainingArguments

from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives import get_objective
from emo_trainer.trainer import ObjectiveTrainer


def _ragged_dataset(n=8, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 9, 30, 12, 3, 25, 8][:n]
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lengths]}
    )


def test_mle_equals_builtin_causal_lm_loss():
    model = make_tiny_gpt2()
    batch = CausalLMCollator(pad_token_id=0)(list(_ragged_dataset()))
    out = model(**batch)  # the model's built-in loss (mean over valid shifted targets)
    ours = get_objective("mle")(out.logits, batch["labels"])
    assert torch.allclose(ours.loss, out.loss, rtol=0, atol=1e-6)
    # with num_items_in_batch, both divide the sum by it
    n = int((batch["labels"][:, 1:] != -100).sum()) + 7
    builtin = model(**batch, num_items_in_batch=torch.tensor(n)).loss
    ours = get_objective("mle")(out.logits, batch["labels"], num_items_in_batch=n)
    assert torch.allclose(ours.loss, builtin, rtol=0, atol=1e-6)


def _one_sgd_step(tmp_path, objective, per_device, accum, options=None):
    model = make_tiny_gpt2(seed=0)
    with torch.no_grad():  # peaked, row-dependent predictions: entropies (MiLe's weights) differ by row
        model.get_output_embeddings().weight.mul_(30.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run_{per_device}_{accum}"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_drop_last=False,
    )
    trainer = ObjectiveTrainer(
        model=model, args=args, objective=objective, objective_options=options,
        train_dataset=_ragged_dataset(4), data_collator=CausalLMCollator(pad_token_id=0),
    )
    trainer.train()
    # SGD with lr 1: the update is minus the gradient
    update = {k: before[k] - v.detach() for k, v in model.named_parameters()}
    return update, next(h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize(
    "objective,options",
    [
        ("mle", {}),
        ("mixce", {"eta": 0.1}),
        ("emo", {"mode": 1}),
        ("emo", {"mode": 2, "cost_embedding": "live"}),
        ("mile", {"gamma": 0.0}),
        ("mile", {"gamma": 1.0}),  # α of the whole step, applied after the last backward (trainer.py)
        ("mile", {"gamma": 2.0}),
    ],
)
def test_gradient_accumulation_equals_big_batch(tmp_path, objective, options):
    big, big_log = _one_sgd_step(tmp_path, objective, per_device=4, accum=1, options=options)
    acc, acc_log = _one_sgd_step(tmp_path, objective, per_device=1, accum=4, options=options)
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-5, rtol=0), k
    assert any(v.abs().max() > 1e-4 for v in big.values())  # the step really moved the weights
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)  # and logs the same loss
    if objective == "mile" and options["gamma"]:  # the step's α, logged once per step
        assert acc_log["alpha"] == pytest.approx(big_log["alpha"], rel=1e-6) and big_log["alpha"] != 1.0


def test_deferred_metrics_are_read_in_batches_when_nothing_logs(tmp_path, monkeypatch):
    """Diagnostics stay on the device between logs; a window longer than _MAX_DEFERRED micro-batches
    (logging off, or a huge logging_steps) is read to floats in one go, with the same means."""
    from emo_trainer import trainer as trainer_mod
    from emo_trainer.data import CausalLMCollator
    from emo_trainer.trainer import ObjectiveTrainer

    monkeypatch.setattr(trainer_mod, "_MAX_DEFERRED", 3)
    model = make_tiny_gpt2(vocab_size=300)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    tr = ObjectiveTrainer(model=model, args=args, objective="emo")
    g = torch.Generator().manual_seed(0)
    values = []
    for i in range(5):
        rows = [torch.randint(1, 300, (12,), generator=g).tolist() for _ in range(2)]
        tr.compute_loss(model, CausalLMCollator(pad_token_id=0)([{"input_ids": r} for r in rows]))
        values.append(tr._metrics["train"]["ce"][-1])
        kinds = [torch.is_tensor(x) for x in tr._metrics["train"]["ce"]]
        expected = [[True], [True, True], [False] * 3, [False] * 3 + [True], [False] * 3 + [True, True]][i]
        assert kinds == expected, (i, kinds)  # tensors until the 3rd micro-batch folds the window to floats
    floats = [float(v) for v in values]
    assert tr._metrics["train"]["ce"][:3] == floats[:3]  # the folded values are the same floats
    means = trainer_mod._window_means(tr._metrics["train"])
    assert abs(means["ce"] - sum(floats) / 5) < 1e-12
