"""The backspace action ``<bkspc>`` of SequenceMatch (Cundy & Ermon, ICLR 2024, arXiv 2306.05426).

SequenceMatch gives the policy one action beyond the vocabulary: ``<bkspc>`` deletes the last
*generated* token.  This module adds it to any Hugging Face tokenizer + causal LM and holds the
small helpers every other part needs (apply deletions to an action list, hide the action from
perplexity).

Initialisation of the new row.  The output row of ``<bkspc>`` (and its lm_head bias, if any) is
set to the *mean* of the rows of the existing vocabulary.  Logits are linear in that row, so the
new logit is exactly the mean logit ``m = (1/V) Σ_v z_v`` in every context, and by the AM–GM
inequality ``Σ_v exp(z_v) ≥ V·exp(m)``, hence

    p(<bkspc> | s) = e^m / (Σ_v e^{z_v} + e^m) ≤ 1 / (V + 1)     for every context s,

with equality only for a uniform model: the action starts (provably) no more likely than a
uniform token — about 2e-5 for GPT-2 — and the other tokens' probabilities change by the same
tiny factor.  With tied weights the input embedding is the same tensor, which is harmless: the
backspace token is never *fed* to the model (states after a backspace are earlier states).  We do
not use ``resize_token_embeddings(mean_resizing=True)`` because it samples the new row at random.

Persistence.  The token id is recorded in ``model.config.backspace_token_id``, which
``save_pretrained`` writes to ``config.json``; the tokenizer saves the added token with its own
files.  A saved model + tokenizer therefore reload with the action in place, and calling
:func:`add_backspace_token` again is a no-op (it never re-initialises a trained row).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKSPACE_TOKEN = "<bkspc>"

__all__ = [
    "BACKSPACE_TOKEN",
    "add_backspace_token",
    "apply_backspaces",
    "backspace_token_id",
    "strip_backspace_logits",
    "unwrap_model",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / DataParallel / accelerate wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def backspace_token_id(tokenizer: Any = None, model: torch.nn.Module | None = None, token: str = BACKSPACE_TOKEN) -> int | None:
    """The id of ``token`` in ``tokenizer`` (or recorded in ``model.config``), or None if absent."""
    if tokenizer is not None:
        ids = tokenizer.convert_tokens_to_ids([token])
        tid = ids[0] if ids else None
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            return int(tid)
        return None
    if model is not None:
        tid = getattr(unwrap_model(model).config, "backspace_token_id", None)
        return None if tid is None else int(tid)
    raise ValueError("backspace_token_id needs a tokenizer or a model")


def add_backspace_token(model: torch.nn.Module, tokenizer: Any, token: str = BACKSPACE_TOKEN) -> int:
    """Add the backspace action to ``tokenizer`` and ``model``; return its id.

    Call it when the model is built, *before* the optimizer is created: resizing the
    embeddings replaces the embedding parameters.  Idempotent: a model/tokenizer pair that
    already has the token (e.g. a saved SequenceMatch checkpoint) is returned unchanged.

    Steps: add ``token`` to the tokenizer as a special token; grow the input embeddings (and an
    untied lm_head) to cover its id if needed; set its output row (and lm_head bias) to the mean
    of the existing rows so that its initial probability is at most 1/(V+1) in every context
    (see the module docstring); record the id in ``model.config.backspace_token_id``.
    """
    model = unwrap_model(model)
    recorded = getattr(model.config, "backspace_token_id", None)
    tid = backspace_token_id(tokenizer, token=token)
    emb = model.get_input_embeddings()
    if tid is not None and recorded is not None:
        if int(recorded) != tid:
            raise ValueError(
                f"tokenizer has {token} = {tid} but model.config.backspace_token_id = {recorded}: "
                "the model and tokenizer come from different checkpoints"
            )
        if emb.weight.shape[0] <= tid:
            raise ValueError(f"model has {emb.weight.shape[0]} embedding rows but {token} has id {tid}")
        return tid  # already set up: never re-initialise a (possibly trained) row
    if tid is None:
        n_before = len(tokenizer)
        if n_before > emb.weight.shape[0]:
            raise ValueError(
                f"tokenizer has {n_before} tokens but the model only {emb.weight.shape[0]} embedding rows: "
                "tokenizer and model vocabularies do not match"
            )
        try:  # transformers ≥ 4.x: AddedToken lives in tokenizers / transformers
            from tokenizers import AddedToken

            new = AddedToken(token, special=True, normalized=False)
        except ImportError:  # pragma: no cover
            new = token
        tokenizer.add_tokens([new], special_tokens=True)
        tid = backspace_token_id(tokenizer, token=token)
        if tid is None:
            raise RuntimeError(f"could not add {token} to {type(tokenizer).__name__}")
    if tid >= emb.weight.shape[0]:
        model.resize_token_embeddings(tid + 1, mean_resizing=False)
    _init_backspace_row(model, tid)
    model.config.backspace_token_id = tid
    logger.info("added %s as token %d (embedding rows: %d)", token, tid, model.get_input_embeddings().weight.shape[0])
    return tid


@torch.no_grad()
def _init_backspace_row(model: torch.nn.Module, tid: int) -> None:
    # Mean over the rows of the vocabulary that precede the new token (ids < tid); rows of a
    # padded vocabulary above tid are unused and left alone.
    out = model.get_output_embeddings()
    weights = {id(w): w for w in (model.get_input_embeddings().weight, getattr(out, "weight", None)) if w is not None}
    for w in weights.values():  # one tensor when tied
        w[tid] = w[:tid].float().mean(0).to(w.dtype)
    bias = getattr(out, "bias", None)
    if bias is not None:
        bias[tid] = bias[:tid].float().mean().to(bias.dtype)


def strip_backspace_logits(logits: torch.Tensor, backspace_id: int | None) -> torch.Tensor:
    """Logits of the original vocabulary: the backspace column set to −inf (a copy).

    This is how perplexity of a SequenceMatch model is defined here (docs/evaluation.md): plain CE on
    clean text over the original vocabulary, the backspace action excluded from the normaliser
    (softmax renormalised over the other columns).  Shapes and token ids are unchanged, so the
    result goes straight into ``F.cross_entropy``.  ``backspace_id=None`` returns ``logits``.
    """
    if backspace_id is None:
        return logits
    out = logits.clone()
    out[..., backspace_id] = float("-inf")
    return out


def apply_backspaces(actions: Sequence[int], backspace_id: int) -> list[int]:
    """The generated tokens that ``actions`` leave once every backspace has deleted its token.

    The prompt is not part of ``actions`` and cannot be deleted: a backspace with nothing to
    delete is an error (the policy masks it, so it never occurs in a valid trajectory).
    """
    out: list[int] = []
    for i, a in enumerate(actions):
        if a == backspace_id:
            if not out:
                raise ValueError(f"action {i} deletes into the protected prompt")
            out.pop()
        else:
            out.append(int(a))
    return out
