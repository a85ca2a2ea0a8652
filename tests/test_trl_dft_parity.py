"""Parity with TRL: ``trl.SFTTrainer`` with ``SFTConfig(loss_type="dft")`` and our ``dft`` give the
same loss and gradients on the same batch, up to TRL's documented normalisation.

* ``compute_loss`` on one batch of TRL's own collator, with the same ``num_items_in_batch`` (None:
  both the token mean of the shifted targets; a count: both divide the sum by it): equal loss and
  equal gradients of every parameter (fp32, 1e-5), and both equal a float64 DFT reference.
* Training (gradient accumulation 2): TRL 1.16's Trainer counts ``num_items_in_batch`` over the
  *unshifted* labels, ours over the targets actually predicted (see test_trl_integration.py for
  MLE), so with every row max_length = 32 long TRL's logged loss is 31/32 of ours.
"""

from __future__ import annotations

import copy

import pytest
import torch
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer
from reference_losses import dft_ref, rel_err

trl = pytest.importorskip("trl")
from datasets import Dataset

from emo_trainer import ObjectiveTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class ObjectiveSFTTrainer(ObjectiveTrainer, trl.SFTTrainer):
    """The combination the README documents."""


@pytest.fixture(scope="module")
def setup():
    docs = documents(60)
    return docs, tiny_tokenizer(docs[:40])


def _model(tok):
    model = tiny_gpt2(tok)
    for m in model.modules():  # no dropout: the two trainers must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2, "report_to": [], "use_cpu": True, "save_strategy": "no",
            "max_length": 32, "disable_tqdm": True, "seed": 0, "data_seed": 0, "learning_rate": 1e-3}
    base.update(kw)
    return trl.SFTConfig(**base)


def _loss_and_grads(trainer, model, batch, num_items):
    model.train()
    model.zero_grad(set_to_none=True)
    n = None if num_items is None else torch.tensor(num_items)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def test_same_batch_same_loss_and_gradients(tmp_path, setup):
    docs, tok = setup
    data = Dataset.from_dict({"text": docs[:8]})
    theirs_model, ours_model = _model(tok), _model(tok)
    theirs = trl.SFTTrainer(model=theirs_model, args=_args(tmp_path / "trl", loss_type="dft"), train_dataset=data,
                            processing_class=tok)
    ours = ObjectiveSFTTrainer(model=ours_model, args=_args(tmp_path / "ours"), train_dataset=data, processing_class=tok,
                               objective="dft")
    batch = next(iter(theirs.get_train_dataloader()))
    labels = batch["labels"]
    shifted = int((labels[:, 1:] != -100).sum())
    assert shifted > 0
    for num_items in (None, shifted, shifted + 9):
        t_loss, t_grads = _loss_and_grads(theirs, theirs_model, batch, num_items)
        o_loss, o_grads = _loss_and_grads(ours, ours_model, batch, num_items)
        assert rel_err(o_loss, t_loss) < 1e-5, (num_items, float(o_loss), float(t_loss))
        for k in t_grads:
            assert rel_err(o_grads[k], t_grads[k]) < 1e-5, (num_items, k)
        ref_model = copy.deepcopy(ours_model).double()
        logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert rel_err(o_loss, dft_ref(logits, labels, num_items=num_items)) < 1e-5


def test_training_logs_differ_by_trls_unshifted_token_count(tmp_path, setup):
    docs, tok = setup
    data = Dataset.from_dict({"text": docs[:16]})
    logs = {}
    for name, cls, kw in (("trl", trl.SFTTrainer, {}), ("ours", ObjectiveSFTTrainer, {"objective": "dft"})):
        args = _args(tmp_path / name, loss_type="dft") if name == "trl" else _args(tmp_path / name)
        trainer = cls(model=_model(tok), args=args, train_dataset=data, processing_class=tok, **kw)
        if name == "trl":
            assert {len(x) for x in trainer.train_dataset["input_ids"]} == {32}
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["trl"]) == len(logs["ours"]) == 2
    assert logs["ours"][0]["loss"] * 31 / 32 == pytest.approx(logs["trl"][0]["loss"], rel=1e-5)
    assert logs["ours"][1]["loss"] * 31 / 32 == pytest.approx(logs["trl"][1]["loss"], rel=2e-3)
    assert "ce" in logs["ours"][0] and "weight" in logs["ours"][0]  # and ours logs plain CE next to it
