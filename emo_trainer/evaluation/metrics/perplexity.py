"""Token-weighted perplexity: exp(Σ NLL / Σ target tokens) over the whole eval set.

Not the exp of a mean of batch means (what a stock ``Trainer``'s ``eval_loss`` is): batches with
fewer target tokens would weigh as much as full ones. Always plain cross-entropy, whatever the
training objective. ``vocab_size`` restricts the softmax to the first ``vocab_size`` logits,
renormalising away any extra action (SequenceMatch's backspace), so perplexity is over the
original vocabulary on clean text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = ["dataloader_nll", "perplexity_from_totals", "sequence_nll"]


def sequence_nll(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token NLL (fp32) and number of target tokens.

    ``logits``: (B, T, V) for positions 0..T-1; ``labels``: (B, T), unshifted (HF convention: the
    target of position t is ``labels[:, t + 1]``), ``ignore_index`` where there is no target.
    Computed one sequence at a time so that at most one (T, V) fp32 copy of the logits exists.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    targets = labels[:, 1:]
    nll = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    for i in range(labels.shape[0]):
        nll[i] = F.cross_entropy(
            logits[i, :-1].float(), targets[i], ignore_index=ignore_index, reduction="sum"
        ).to(labels.device)
    return nll, (targets != ignore_index).sum(dim=1)


def perplexity_from_totals(nll_sum: float, num_tokens: int) -> float:
    """exp(nll_sum / num_tokens); ``inf`` on overflow. Raises if there is no target token."""
    if num_tokens <= 0:
        raise ValueError("perplexity: the eval set has no target tokens (every label is -100)")
    mean = nll_sum / num_tokens
    return math.exp(mean) if mean < 700 else math.inf


def _batch_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


@torch.no_grad()
def dataloader_nll(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    vocab_size: int | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """(Σ NLL, Σ target tokens) of ``model`` over ``batches`` (causal-LM batches; labels optional).

    ``gather``: called on each batch's per-sequence ``(B, 2)`` tensor of (nll, tokens) to collect
    it from every process — pass ``trainer.accelerator.gather_for_metrics`` under ``accelerate``
    so that the samples duplicated to even out the last batch are dropped. Without it, only this
    process's batches are counted.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_total, tokens_total = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            labels = _batch_labels(batch)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            nll, count = sequence_nll(logits, labels, vocab_size)
            stats = torch.stack([nll.double(), count.double()], dim=1)
            if gather is not None:
                stats = gather(stats)
            nll_total += float(stats[:, 0].sum())
            tokens_total += int(stats[:, 1].sum())
    finally:
        model.train(was_training)
    return nll_total, tokens_total
