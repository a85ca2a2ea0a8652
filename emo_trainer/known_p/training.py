"""Training a model of a known language with any registered objective.

Two paths, one result (a trained model to hand to :func:`~emo_trainer.known_p.metrics.evaluate_model`):

* :func:`train_loop` — a plain PyTorch loop over the public objective API (``setup``,
  ``on_step_begin``, ``split_batch``, ``count_items``, ``__call__``).  Fast and dependency-free:
  the unit tests and the bigram family use it.
* :func:`train_with_trainer` — the project's ``ObjectiveTrainer`` (a ``transformers.Trainer``),
  so the code path users run is the one measured.  The lab uses it for the tiny-GPT-2 family.

Both see the same batches: one sequence per example, ``input_ids = [<bos>] + seq`` right-padded
with ``<pad>``, ``labels`` = ``input_ids`` with −100 on padding (the ``<bos>`` label is never a
target after the shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..objectives import IGNORE_INDEX, Objective
from .bigram import BigramConfig, BigramLM
from .markov import MarkovChain

__all__ = ["SequenceDataset", "collate", "make_model", "train_loop", "train_with_trainer"]


class SequenceDataset(torch.utils.data.Dataset):
    """Sequences of a language as ``{"input_ids": [<bos>, x1, …]}`` examples (for the Trainer)."""

    def __init__(self, chain: MarkovChain, sequences: Sequence[np.ndarray]):
        self.bos_id = chain.bos_id
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": [self.bos_id, *self.sequences[i].tolist()]}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``; ``attention_mask``; ``labels`` with −100 on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples):
        return collate(examples, self.pad_id)


def make_model(family: str, chain: MarkovChain, max_length: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised model of ``family`` for ``chain``.

    ``bigram``: :class:`BigramLM` (full-rank by default).  ``gpt2``: a tiny GPT-2 built from a
    config (2 layers, width 64, 2 heads unless overridden), positions for ``max_length + 1``
    tokens.  ``overrides`` go to the config.
    """
    torch.manual_seed(seed)
    ids = {"bos_token_id": chain.bos_id, "eos_token_id": chain.eos_id, "pad_token_id": chain.pad_id}
    if family == "bigram":
        return BigramLM(BigramConfig(vocab_size=chain.model_vocab_size, **ids, **overrides))
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": max_length + 1,
               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides}
        return GPT2LMHeadModel(GPT2Config(vocab_size=chain.model_vocab_size, **ids, **cfg))
    raise ValueError(f"unknown model family '{family}'; choose 'bigram' or 'gpt2'")


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_loop(
    model: torch.nn.Module,
    objective: Objective,
    chain: MarkovChain,
    sequences: Sequence[np.ndarray],
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-2,
    warmup_steps: int = 0,
    seed: int = 0,
    tokenizer: Any = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with ``objective`` for ``steps`` optimizer steps, on the model's device.

    AdamW (weight decay 0), cosine schedule after ``warmup_steps`` of linear warm-up, batches
    of ``batch_size`` sequences drawn by a seeded shuffle (reshuffled each epoch).  Returns
    the logged metrics of every step (``loss`` and the objective's diagnostics).
    """
    objective.setup(model, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps))
    # Pad everything once (on the model's device); a batch is a row slice trimmed to its longest sequence.
    device = next(model.parameters()).device
    all_batch = {k: v.to(device) for k, v in collate(list(SequenceDataset(chain, sequences)), chain.pad_id).items()}
    lengths = all_batch["attention_mask"].sum(1)
    batch_size = min(batch_size, len(lengths))
    rng = np.random.default_rng(seed)
    order, cursor, logs = rng.permutation(len(lengths)), 0, []
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(lengths)), 0
        rows = torch.as_tensor(order[cursor : cursor + batch_size], device=device)
        cursor += batch_size
        width = int(lengths[rows].max())
        batch = {k: v[rows, :width] for k, v in all_batch.items()}
        objective.on_step_begin(model, step)
        model_inputs, loss_inputs = objective.split_batch(model, batch)
        n_items = objective.count_items(batch)
        out = objective(model(**model_inputs).logits, num_items_in_batch=n_items, **loss_inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        logs.append({"loss": float(out.loss.detach()), **out.metrics})
    model.eval()
    return logs


def train_with_trainer(
    model: torch.nn.Module,
    objective: Objective | str,
    chain: MarkovChain,
    sequences: Sequence[np.ndarray],
    output_dir: str,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-2,
    warmup_steps: int = 0,
    seed: int = 0,
    tokenizer: Any = None,
    objective_options: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` with ``emo_trainer.trainer.ObjectiveTrainer`` (same schedule as :func:`train_loop`)."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from ..trainer import ObjectiveTrainer

    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    kwargs: dict[str, Any] = {}
    if objective_options:
        kwargs["objective_options"] = objective_options
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        train_dataset=SequenceDataset(chain, sequences),
        data_collator=_Collator(chain.pad_id),
        processing_class=tokenizer,
        objective=objective,
        model_is_fresh=True,
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # the lab prints its own one-line summary per run
    trainer.train()
    model.eval()
    return [h for h in trainer.state.log_history if "loss" in h]
