"""The ecosystem's objectives (dft, tailr, focal, eaft, mle with label smoothing and z-loss) are
selected like the others from the config / command line, train under bf16 autocast with finite
losses, and log plain CE and the mean weight next to the loss."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import TrainingArguments

from emo_trainer.config import load_config
from emo_trainer.data import CausalLMCollator
from emo_trainer.objectives import get_objective
from emo_trainer.trainer import ObjectiveTrainer

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

CASES = {
    "dft": {},
    "tailr": {"gamma": 0.3, "min_weight": 0.05},
    "focal": {"gamma": 2.0},
    "eaft": {"alpha": 0.5, "top_k": 5},
    "mle": {"label_smoothing": 0.1, "z_loss": 1e-4},
}


@pytest.mark.parametrize("name", CASES)
def test_selected_from_the_command_line(name):
    argv = ["--objective", name] + [f"--{name}.{k}={v}" for k, v in CASES[name].items()]
    cfg = load_config(QUICK, argv)
    assert cfg.objective.name == name
    assert cfg.objective.selected_options() == CASES[name]
    obj = get_objective(name, **cfg.objective.selected_options())
    assert {k: obj.options()[k] for k in CASES[name]} == CASES[name]


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_training_stays_finite_and_logs_ce(tmp_path, name):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in torch.randint(6, 17, (24,), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, bf16=True,
    )
    trainer = ObjectiveTrainer(model=make_tiny_gpt2(n_layer=2), args=args, objective=name, objective_options=CASES[name],
                               train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                               data_collator=CausalLMCollator(pad_token_id=0))
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
        assert "ce" in h and h["ce"] > 0
        assert ("weight" in h) == (name != "mle")
        if name == "focal":
            assert "alpha" in h
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
