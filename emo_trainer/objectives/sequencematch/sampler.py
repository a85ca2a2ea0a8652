"""Backspace-aware batched sampling (SequenceMatch's policy, also used for evaluation).

Each step every unfinished sequence takes one action from the model's distribution at its
current state: a vocabulary token, or ``<bkspc>`` which deletes the last generated token.
``<bkspc>`` is masked (logit −∞) while nothing has been generated, so the prompt is never
deleted.  A sequence stops on EOS (terminal), when ``max_new_tokens`` generated tokens survive,
or after ``max_actions`` actions (default ``2 * max_new_tokens``), which bounds the work of a
policy that keeps typing and deleting.

KV cache with backspaces — exact, batched, no per-sequence crop.  The cache is a *tape*: every
fed token gets a slot and slots are never removed.  An ``alive`` flag per slot says whether the
token is on the sequence's current state; each new query attends through a 4-D mask to the
alive slots only, at ``position_ids`` = its depth.  A backspace

1. marks the deleted token's slot dead (logically rolling the cache back), and
2. marks the new last token's slot dead and feeds that token again as the next input, at its
   own depth: it sees the same alive ancestors, so it gets the same keys/values and its output
   is the logits of the state after the deletion (states are never cached as V-sized logits).

Every action therefore costs exactly one single-token forward for the whole batch, whether it
types or deletes; the cache grows by one slot per action (≤ prompt + ``max_actions``).  The
per-step logits equal a separate forward over the explicit surviving tokens (tested to 1e-5 in
fp32).  ``DynamicCache.crop`` would only roll back all rows together, and re-running each state
without a cache costs O(L²).  Requires an attention implementation that honours custom 4-D
masks (``eager`` or ``sdpa``) and a full (non-sliding-window) cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import without_cudnn_sdpa
from .backspace import BACKSPACE_TOKEN, backspace_token_id, unwrap_model

__all__ = [
    "BackspaceGenerationOutput",
    "check_custom_mask_support",
    "filter_logits",
    "generate_text",
    "generate_with_backspace",
    "max_positions",
    "sample_continuations_with_backspace",
]

SUPPORTED_ATTENTION = ("eager", "sdpa")


def check_custom_mask_support(model: torch.nn.Module) -> None:
    """Fail early when the model's attention kernel would ignore a custom 4-D mask."""
    impl = getattr(unwrap_model(model).config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"SequenceMatch needs custom 4-D attention masks, which attn_implementation={impl!r} does not "
            f"support; load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length (position ids must stay below it), if its config says."""
    cfg = getattr(unwrap_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class BackspaceGenerationOutput:
    """Result of :func:`generate_with_backspace` (one entry per prompt row).

    Attributes:
        sequences: (B, P + max_new_tokens) — the prompt as given, then the final continuation
            (deletions applied), right-padded with ``pad_token_id``.
        continuations: final generated token ids (deletions applied), without padding.
        actions: every action taken, ``<bkspc>`` included, in order.
        terminal: True when the sequence ended with EOS.
        num_backspaces: number of ``<bkspc>`` actions.
        step_logits: with ``return_step_logits``, per row the fp32 logits (before any processing)
            of the state each action was taken from — for tests and analysis.
    """

    sequences: torch.Tensor
    continuations: list[list[int]]
    actions: list[list[int]]
    terminal: list[bool]
    num_backspaces: list[int]
    step_logits: list[list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def backspace_rate(self) -> float:
        """Backspaces / actions over the batch."""
        n = sum(len(a) for a in self.actions)
        return sum(self.num_backspaces) / n if n else 0.0


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)`` of the longest one's width."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, top-k and nucleus (top-p) filtering of (B, V) logits (−∞ = removed)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p (≥ 1 token)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@without_cudnn_sdpa  # tree masks of changing length (emo_trainer/objectives/sequencematch/attention.py)
@torch.no_grad()
def generate_with_backspace(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    backspace_token_id: int,
    max_new_tokens: int = 64,
    max_actions: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_step_logits: bool = False,
) -> BackspaceGenerationOutput:
    """Sample continuations of a batch of prompts with the backspace action enabled.

    Args:
        model: a causal LM whose vocabulary includes ``backspace_token_id`` (eager/sdpa attention).
        input_ids, attention_mask: (B, P) prompts, left- or right-padded; each row needs ≥ 1 token.
        max_new_tokens: stop once this many generated tokens survive (non-terminal).
        max_actions: cap on actions per sequence, ``<bkspc>`` included (default 2·max_new_tokens).
        eos_token_id: id(s) that end a sequence (terminal).  None: never.
        do_sample: False = greedy (argmax).  temperature / top_k / top_p as in ``generate``
            (defaults: pure ancestral sampling).
        generator: a torch.Generator on the model's device, for reproducible samples.
        logits_processor: optional ``f(logits (B, V) fp32) -> logits`` applied before the
            backspace mask and the filters.
    """
    model = unwrap_model(model)
    check_custom_mask_support(model)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be ≥ 1")
    max_actions = 2 * max_new_tokens if max_actions is None else int(max_actions)
    if max_actions < 1:
        raise ValueError("max_actions must be ≥ 1")
    eos = set() if eos_token_id is None else ({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    pad = int(pad_token_id if pad_token_id is not None else (min(eos) if eos else 0))
    device = input_ids.device
    b, p = input_ids.shape
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if bool((am.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token")
    limit = max_positions(model)
    if limit is not None and int(am.sum(-1).max()) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({int(am.sum(-1).max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions: shorten the prompts or max_new_tokens"
        )
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    neg = torch.finfo(dtype).min
    was_training = model.training
    model.eval()
    try:
        alive = am.bool()
        pos = (am.long().cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        visible = (causal[None] & alive[:, None, :]) | torch.eye(p, dtype=torch.bool, device=device)[None]
        mask = torch.zeros((b, 1, p, p), dtype=dtype, device=device).masked_fill_(~visible[:, None], neg)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        last = p - 1 - torch.flip(am, dims=[-1]).long().argmax(-1)  # last real position of each row
        logits = out.logits[torch.arange(b, device=device), last].float()

        prompt_len = am.sum(-1).tolist()
        stacks = [[(int(last[i]), int(input_ids[i, last[i]]))] for i in range(b)]  # (slot, token) of the state's tail
        gen: list[list[int]] = [[] for _ in range(b)]
        actions: list[list[int]] = [[] for _ in range(b)]
        terminal = [False] * b
        done = [False] * b
        n_bk = [0] * b
        step_logits: list[list[torch.Tensor]] | None = [[] for _ in range(b)] if return_step_logits else None
        for _ in range(max_actions):
            if step_logits is not None:
                for i in range(b):
                    if not done[i]:
                        step_logits[i].append(logits[i].detach().to("cpu", copy=True))
            if logits_processor is not None:
                logits = logits_processor(logits)
            no_gen = torch.tensor([len(g) == 0 for g in gen], device=device)
            logits[:, backspace_token_id] = logits[:, backspace_token_id].masked_fill(no_gen, float("-inf"))
            if do_sample:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                chosen = logits.argmax(-1)
            chosen = chosen.tolist()
            feed_tok, feed_pos, feed_alive = [pad] * b, [0] * b, [False] * b
            slot = alive.shape[1]  # the slot every fed token of this step gets
            for i in range(b):
                if done[i]:
                    continue
                a = int(chosen[i])
                actions[i].append(a)
                if a == backspace_token_id:
                    n_bk[i] += 1
                    gen[i].pop()
                    dead, _ = stacks[i].pop()
                    alive[i, dead] = False
                    parent_slot, parent_tok = stacks[i].pop()
                    alive[i, parent_slot] = False  # replaced by the re-fed copy below
                    tok = parent_tok
                else:
                    gen[i].append(a)
                    tok = a
                    if a in eos:
                        done[i] = terminal[i] = True
                    elif len(gen[i]) >= max_new_tokens:
                        done[i] = True
                if len(actions[i]) >= max_actions:
                    done[i] = True
                if not done[i]:
                    feed_tok[i], feed_alive[i] = tok, True
                    feed_pos[i] = prompt_len[i] + len(gen[i]) - 1  # depth of the state's last token
                    stacks[i].append((slot, tok))
            if all(done):
                break
            alive = torch.cat([alive, torch.tensor(feed_alive, device=device)[:, None]], dim=1)
            vis = alive.clone()
            vis[:, -1] = True  # finished rows' dummy query sees itself: no fully masked row
            step_mask = torch.zeros((b, 1, 1, slot + 1), dtype=dtype, device=device).masked_fill_(~vis[:, None, None], neg)
            out = model(
                input_ids=torch.tensor(feed_tok, device=device)[:, None],
                attention_mask=step_mask,
                position_ids=torch.tensor(feed_pos, device=device)[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
    finally:
        model.train(was_training)
    sequences = torch.full((b, p + max_new_tokens), pad, dtype=torch.long, device=device)
    sequences[:, :p] = input_ids
    for i, g in enumerate(gen):
        if g:
            sequences[i, p : p + len(g)] = torch.tensor(g, device=device)
    return BackspaceGenerationOutput(
        sequences=sequences, continuations=gen, actions=actions, terminal=terminal, num_backspaces=n_bk,
        step_logits=step_logits,
    )


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    backspace_token: str = BACKSPACE_TOKEN,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Decoded continuations (deletions applied) of text ``prompts``; ``kwargs`` go to
    :func:`generate_with_backspace` (sampling options, ``generator``, ``max_actions``...)."""
    bk = backspace_token_id(tokenizer, token=backspace_token)
    if bk is None:
        raise ValueError(f"the tokenizer has no {backspace_token}: call add_backspace_token(model, tokenizer) first")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(unwrap_model(model).parameters()).device
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = generate_with_backspace(
        model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
        backspace_token_id=bk, max_new_tokens=max_new_tokens, **kwargs,
    )
    return [tokenizer.decode(c, skip_special_tokens=skip_special_tokens) for c in out.continuations]


@torch.no_grad()
def sample_continuations_with_backspace(model: Any, tokenizer: Any, prompts: Sequence[str], config: Any, *, seed: int = 0) -> list[str]:
    """Evaluation sampler for SequenceMatch models (the ``Sampler`` protocol of
    :mod:`emo_trainer.evaluation.generation`): like ``sample_continuations`` — prompts tokenized as the
    tokenizer does by default, left-truncated to fit the context, left padding, batches of
    ``config.batch_size``, ``config`` temperature/top-k/top-p — but with the backspace action
    enabled; returns the decoded final text (deletions applied, special tokens skipped).

    The torch RNG is used as seeded by the caller (``generate_continuations`` seeds it with
    ``seed``); ``max_actions`` is 2·``max_new_tokens``.
    """
    model = unwrap_model(model)
    bk = backspace_token_id(tokenizer)
    if bk is None:
        bk = backspace_token_id(model=model)
    if bk is None:
        raise ValueError("the model has no backspace token; use the plain sampler or add_backspace_token first")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    max_pos = max_positions(model)
    max_prompt = None if max_pos is None else max(1, max_pos - config.max_new_tokens)
    texts: list[str] = []
    for start in range(0, len(prompts), config.batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + config.batch_size]]
        encoded = [ids[-max_prompt:] if max_prompt is not None else ids for ids in encoded]
        encoded = [ids if ids else [eos if eos is not None else pad] for ids in encoded]
        input_ids, attention_mask = left_pad(encoded, pad)
        out = generate_with_backspace(
            model, input_ids.to(device), attention_mask.to(device), backspace_token_id=bk,
            max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        )
        texts.extend(tokenizer.decode(c, skip_special_tokens=True) for c in out.continuations)
    return texts
