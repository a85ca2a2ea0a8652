"""Checks shared by the tests of the ecosystem's token-weighted objectives (issue 17):
``dft``, ``tailr``, ``focal``, ``eaft`` and ``mle``'s ``label_smoothing`` / ``z_loss``.

* :func:`check_objective_against_reference` — value and logits-gradient against a float64
  reference (float64, fp32, bf16 logits; with and without ``num_items_in_batch``), plus −∞ columns.
* :func:`check_trainer_matches_reference` — through ``ObjectiveTrainer.compute_loss`` on a tiny
  GPT-2, on the full and the chunked loss path: loss and every parameter gradient against the
  same model run in float64 with the reference loss.
* :func:`check_gradient_accumulation` — one SGD step through ``Trainer.train``: 4 micro-batches of
  1 row (gradient accumulation) equal 1 batch of 4 rows, in update and logged loss.
"""

from __future__ import annotations

import copy

import datasets
import torch
from conftest import make_tiny_gpt2
from reference_losses import (
    IGNORE,
    check_against_reference,
    make_batch,
    num_targets,
    objective_loss,
    rel_err,
    value_and_grad,
    with_masked_columns,
)
from transformers import TrainingArguments

from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives import get_objective
from emo_trainer.trainer import ObjectiveTrainer

DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def check_objective_against_reference(objective, reference, vocab: int, dtype: torch.dtype, seed: int = 0):
    logits, labels = make_batch(4, 6, vocab, seed=seed)
    for num_items in (None, num_targets(labels) + 5):
        check_against_reference(objective, reference, logits, labels, dtype, num_items)


def check_masked_columns(objective, reference, vocab: int = 13, seed: int = 3, tol: float = 1e-5):
    """−∞ logits (a masked vocabulary) in two columns: finite loss and gradient, equal to the
    float64 reference, and no gradient at all into the masked columns."""
    logits, labels = make_batch(3, 6, vocab, seed=seed)
    masked = with_masked_columns(logits, labels)
    loss, grad = value_and_grad(lambda z: objective_loss(objective, z, labels), masked.float())
    ref, ref_grad = value_and_grad(lambda z: reference(z, labels), masked)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < tol and rel_err(grad, ref_grad) < tol
    assert float(grad[torch.isinf(masked)].abs().max()) == 0.0


def _batch(vocab: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (20, 13, 7)]
    return CausalLMCollator(pad_token_id=0)([{"input_ids": r} for r in rows])


def check_trainer_matches_reference(tmp_path, name: str, options: dict, reference, tol: float = 2e-5):
    """ObjectiveTrainer.compute_loss (fp32; full and chunked path, num_items_in_batch given) vs the
    float64 reference on the float64 copy of the same model: loss and parameter gradients."""
    model = make_tiny_gpt2(seed=1)
    with torch.no_grad():  # sharper predictions: weights spread over their range
        model.get_output_embeddings().weight.mul_(8.0)
    ref_model = copy.deepcopy(model).double()
    batch = _batch()
    n_items = int((batch["labels"][:, 1:] != IGNORE).sum()) + 3
    ref_model.train()
    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_loss = reference(logits, batch["labels"], num_items=n_items)
    ref_loss.backward()
    ref_grads = {k: p.grad for k, p in ref_model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "ref"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, objective=name, objective_options=options, chunk_size=16)
    for path in ("full", "chunked"):
        trainer.loss_path = path
        model.train()
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
        loss.backward()
        assert rel_err(loss, ref_loss) < tol, (path, float(loss), float(ref_loss))
        for k, p in model.named_parameters():
            assert rel_err(p.grad, ref_grads[k]) < tol, (path, k, rel_err(p.grad, ref_grads[k]))
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert "ce" in metrics and "weight" in metrics or name == "mle", metrics
    return trainer


def _ragged_dataset(vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(1, vocab, (L,), generator=g).tolist() for L in (5, 17, 9, 30)]}
    )


def _one_sgd_step(tmp_path, name, options, per_device, accum, loss_path):
    model = make_tiny_gpt2(seed=0)
    with torch.no_grad():  # peaked, row-dependent predictions: weights differ by row
        model.get_output_embeddings().weight.mul_(4.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run_{per_device}_{accum}_{loss_path}"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, weight_decay=0.0, report_to="none", save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = ObjectiveTrainer(model=model, args=args, objective=name, objective_options=options, loss_path=loss_path,
                               chunk_size=8, train_dataset=_ragged_dataset(), data_collator=CausalLMCollator(pad_token_id=0))
    trainer.train()
    update = {k: before[k] - v.detach() for k, v in model.named_parameters()}
    return update, next(h for h in trainer.state.log_history if "loss" in h)


def check_gradient_accumulation(tmp_path, name: str, options: dict, loss_path: str = "full"):
    big, big_log = _one_sgd_step(tmp_path, name, options, 4, 1, loss_path)
    acc, acc_log = _one_sgd_step(tmp_path, name, options, 1, 4, loss_path)
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-5, rtol=0), k
    assert any(v.abs().max() > 1e-4 for v in big.values())  # the step really moved the weights
    assert abs(acc_log["loss"] - big_log["loss"]) <= 1e-5 * abs(big_log["loss"])  # and logs the same loss
    assert "ce" in big_log and "ce" in acc_log  # plain CE next to the objective's loss
    return big_log, acc_log


def assert_option_error(name: str, match: str, **options):
    import pytest

    with pytest.raises(ValueError, match=match):
        get_objective(name, **options)
