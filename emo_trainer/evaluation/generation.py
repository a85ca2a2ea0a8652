"""Batched sampling of continuations for evaluation (``docs/evaluation.md``, "Protocol").

:func:`generate_continuations` is the entry point. It

1. shards the prompts over the ``accelerate`` processes (contiguous, equal-length shards),
2. puts the model in generation mode — ``eval()``, KV cache on, the checkpoint's own
   ``generation_config`` sampling defaults set aside, training RNG state untouched — and restores
   everything afterwards,
3. calls a *sampler* on this process's shard, with the torch RNG seeded from ``seed``,
4. gathers the texts from every process, in prompt order.

The default sampler, :func:`sample_continuations`, is pure ancestral sampling with
``model.generate`` (temperature 1, top-k 0, top-p 1 unless configured), left padding, batches of
``batch_size`` prompts, ``max_new_tokens`` new tokens, and decodes only the new tokens. A
different sampler (e.g. SequenceMatch's backspace-aware one) plugs in through ``sampler=``: any
callable with the signature of :func:`sample_continuations` that returns one continuation text
per prompt, in order (new text only, no prompt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from .config import EvalConfig
from .sharding import gather_in_order, process_info, shard_for_process

__all__ = ["Sampler", "generate_continuations", "generation_mode", "sample_continuations"]


class Sampler(Protocol):
    def __call__(
        self, model: Any, tokenizer: Any, prompts: Sequence[str], config: EvalConfig, *, seed: int = 0
    ) -> list[str]: ...


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / accelerate wrappers keep the HF model in `.module`; PEFT models generate themselves.
    while hasattr(model, "module") and not hasattr(model, "generate"):
        model = model.module
    return model


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode + KV cache + a neutral ``generation_config`` for the duration; everything restored after.

    Gradient checkpointing needs no change: transformers only applies it (and forces
    ``use_cache=False``) in training mode, and the model is in eval mode here. The model's
    ``generation_config`` is replaced by one that keeps only its special-token ids, so that a
    checkpoint's shipped sampling defaults (top-k 50, repetition penalty, ...) cannot change the
    protocol; every sampling knob comes from :class:`EvalConfig`.
    """
    from transformers import GenerationConfig

    was_training = model.training
    base = _unwrap(model)
    # PEFT wraps the HF model: its config and generation_config live on the base model.
    hf_model = base.get_base_model() if hasattr(base, "get_base_model") else base
    config = getattr(hf_model, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    old_gen_config = getattr(hf_model, "generation_config", None)
    model.eval()
    try:
        if config is not None and old_use_cache is not None:
            config.use_cache = True
        if old_gen_config is not None:
            ids = {k: getattr(old_gen_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                  "decoder_start_token_id")}
            hf_model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        yield base
    finally:
        if old_gen_config is not None:
            hf_model.generation_config = old_gen_config
        if config is not None and old_use_cache is not None:
            config.use_cache = old_use_cache
        model.train(was_training)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def sample_continuations(
    model: Any, tokenizer: Any, prompts: Sequence[str], config: EvalConfig, *, seed: int = 0
) -> list[str]:
    """Sample one continuation per prompt with ``model.generate`` (left padding, KV cache, batched).

    Prompts are tokenized as the tokenizer does by default (special tokens included, e.g. a BOS),
    left-truncated if prompt + ``max_new_tokens`` would exceed the model's context. Generation
    stops at EOS; only the new tokens are decoded, with special tokens skipped.
    """
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        eos_id = getattr(model.generation_config, "eos_token_id", None)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_id if isinstance(eos_id, int) else 0
    max_positions = _max_positions(model)
    max_prompt = None if max_positions is None else max(1, max_positions - config.max_new_tokens)
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
    texts: list[str] = []
    torch.manual_seed(seed)  # inside generate_continuations' fork_rng, so the training RNG is untouched
    for start in range(0, len(prompts), config.batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + config.batch_size]]
        if max_prompt is not None:
            encoded = [ids[-max_prompt:] for ids in encoded]
        encoded = [ids or [pad_id] for ids in encoded]  # an empty prompt: start from one pad/EOS token
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends at the same position
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
            **sampling,
        )
        new = out[:, width:].tolist()
        for row in new:
            if eos_id is not None:  # cut at the first EOS (what follows is padding)
                eos_ids = eos_id if isinstance(eos_id, list) else [eos_id]
                cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                row = row[:cut]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: EvalConfig,
    *,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> list[str]:
    """One sampled continuation per prompt, on every process, in prompt order (see the module docstring).

    Under ``accelerate`` with several processes each process samples its shard (seeded with
    ``seed + process_index``) and the texts are gathered; every process returns the full list.
    The global torch RNG state (CPU and CUDA) is the same after the call as before.
    """
    sampler = sampler or sample_continuations
    prompts = list(prompts)
    rank, _ = process_info()
    shard = shard_for_process(prompts)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), generation_mode(model) as base:
        torch.manual_seed(seed + rank)
        local = sampler(base, tokenizer, shard, config, seed=seed + rank) if shard else []
    if len(local) != len(shard):
        raise RuntimeError(f"the sampler returned {len(local)} texts for {len(shard)} prompts")
    return gather_in_order(local, len(prompts))
