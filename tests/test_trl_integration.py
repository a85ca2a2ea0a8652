"""TRL: ``ObjectiveTrainer`` combined with ``trl.SFTTrainer`` (TRL's data handling, our objectives).

``class ObjectiveSFTTrainer(ObjectiveTrainer, SFTTrainer)`` takes SFTTrainer's dataset
preparation and collator and ObjectiveTrainer's loss, reduction, diagnostics and eval loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

trl = pytest.importorskip("trl")
from datasets import Dataset

from emo_trainer import ObjectiveTrainer


class ObjectiveSFTTrainer(ObjectiveTrainer, trl.SFTTrainer):
    """The combination the README documents."""


@pytest.fixture(scope="module")
def setup():
    docs = documents(80)
    return docs, tiny_tokenizer(docs[:60])


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "max_steps": 2, "logging_steps": 1, "eval_strategy": "steps",
            "eval_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
            "gradient_accumulation_steps": 2, "report_to": [], "use_cpu": True, "save_strategy": "no",
            "max_length": 32, "disable_tqdm": True, "seed": 0, "data_seed": 0, "learning_rate": 1e-3}
    base.update(kw)
    return trl.SFTConfig(**base)


def _run(cls, tmp_path, docs, tok, **kw):
    data = Dataset.from_dict({"text": docs[:32]})
    trainer = cls(model=tiny_gpt2(tok), args=_args(tmp_path), train_dataset=data,
                  eval_dataset=Dataset.from_dict({"text": docs[40:48]}), processing_class=tok, **kw)
    trainer.train()
    logs = trainer.state.log_history
    train = [h for h in logs if "loss" in h and "eval_loss" not in h]
    evals = [h for h in logs if "eval_loss" in h]
    return trainer, train, evals


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mle_through_the_combination_is_sft_trainer_with_the_shifted_token_count(tmp_path, setup):
    """Same batches, same NLL sum; TRL 1.16's SFTTrainer divides it by the *unshifted* label count
    (transformers counts ``labels[..., 1:]`` only when the model config names a shifting loss
    type), ObjectiveTrainer by the targets actually predicted.  Every training row here is
    max_length = 32 labels long, so TRL's count is 32/31 of ours at every step."""
    docs, tok = setup
    sft, ref_train, ref_eval = _run(trl.SFTTrainer, tmp_path / "sft", docs, tok)
    assert {len(x) for x in sft.train_dataset["input_ids"]} == {32}
    _, our_train, our_eval = _run(ObjectiveSFTTrainer, tmp_path / "ours", docs, tok, objective="mle")
    assert len(ref_train) == len(our_train) == 2
    assert our_train[0]["loss"] * 31 / 32 == pytest.approx(ref_train[0]["loss"], rel=1e-5)
    # Step 2 starts from (nearly) the same weights: Adam's update does not see a constant factor.
    # (Gradient norms are not compared: TRL's fused-head gradient came out ~0.3% off the exact CE
    # gradient inside its training loop here, while ours equals an independent CE reference.)
    assert our_train[1]["loss"] * 31 / 32 == pytest.approx(ref_train[1]["loss"], rel=2e-3)
    # Eval: one batch of 8 rows, both the plain token mean of the shifted targets.
    assert our_eval[0]["eval_loss"] == pytest.approx(ref_eval[0]["eval_loss"], rel=1e-5)
    assert our_eval[0]["eval_perplexity"] == pytest.approx(math.exp(our_eval[0]["eval_loss"]), rel=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("objective", ["emo", "mixce", "mile"])
def test_other_objectives_train_and_log_their_diagnostics(tmp_path, setup, objective):
    docs, tok = setup
    opts = {"cost_embedding": "live"} if objective == "emo" else {}
    trainer, train, evals = _run(ObjectiveSFTTrainer, tmp_path, docs, tok, objective=objective, objective_options=opts)
    key = {"emo": "demd", "mixce": "q_gold", "mile": "alpha"}[objective]
    assert all(key in h and math.isfinite(h[key]) and math.isfinite(h["loss"]) for h in train)
    assert "ce" in train[0] and "eval_perplexity" in evals[0]
    assert trainer.objective.name == objective
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_end_of_training_log_and_saved_state_with_a_step_scale(tmp_path, setup):
    """The last step is not a logging step: TRL's log averages the shared metrics window into the
    end-of-training summary, which must hold floats (save_state writes it as JSON)."""
    docs, tok = setup
    data = Dataset.from_dict({"text": docs[:32]})
    trainer = ObjectiveSFTTrainer(model=tiny_gpt2(tok), args=_args(tmp_path, max_steps=3, logging_steps=2,
                                                                    eval_strategy="no"),
                                  train_dataset=data, processing_class=tok, objective="mile")
    trainer.train()
    trainer.save_state()
    assert (tmp_path / "trainer_state.json").is_file()
