"""Model trajectories for SequenceMatch: a FIFO replay buffer and the sampler that fills it.

The χ²-mixture objective needs states visited by the current policy (ℳ).  Every
``sample_every`` optimizer steps the objective samples continuations of data prefixes with the
current model (backspace enabled, see :mod:`emo_trainer.objectives.sequencematch.sampler`) and pushes them
here; each training micro-batch then draws trajectories uniformly from the buffer.  The buffer
is FIFO: when full, the oldest trajectories leave first.  Stale samples are allowed — the
objective holds for any occupancy (docs/objectives.md §5) — and their age (optimizer steps since
they were sampled) is logged.

Under ``accelerate``/DDP every process owns its buffer and samples from the prefixes of its own
data shard, i.e. each process samples its share; nothing is communicated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .backspace import unwrap_model
from .sampler import generate_with_backspace, left_pad, max_positions

__all__ = ["ModelTrajectory", "ReplayBuffer", "data_prefixes", "sample_trajectories"]


@dataclass
class ModelTrajectory:
    """A sampled trajectory: the protected ``prompt``, the ``actions`` (``<bkspc>`` included),
    whether it ended with EOS (``terminal``) and the optimizer ``step`` it was sampled at."""

    prompt: list[int]
    actions: list[int]
    terminal: bool
    step: int


class ReplayBuffer:
    """FIFO buffer of :class:`ModelTrajectory` with uniform draws."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"buffer_size must be ≥ 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque[ModelTrajectory] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._items)

    def push(self, trajectories: Iterable[ModelTrajectory]) -> None:
        """Append; the oldest items are evicted beyond ``capacity``."""
        self._items.extend(trajectories)

    def items(self) -> list[ModelTrajectory]:
        """Oldest first."""
        return list(self._items)

    def draw(self, n: int, generator: torch.Generator | None = None) -> list[ModelTrajectory]:
        """``min(n, len)`` distinct trajectories drawn uniformly at random."""
        n = min(int(n), len(self._items))
        if n <= 0:
            return []
        idx = torch.randperm(len(self._items), generator=generator)[:n].tolist()
        return [self._items[i] for i in idx]

    def mean_age(self, step: int) -> float:
        """Mean of ``step − sampled step`` over the buffer (0 when empty)."""
        if not self._items:
            return 0.0
        return sum(step - t.step for t in self._items) / len(self._items)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [asdict(t) for t in self._items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._items = deque((ModelTrajectory(**t) for t in state["items"]), maxlen=self.capacity)


def data_prefixes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefix_tokens: int, num: int | None = None
) -> list[list[int]]:
    """Prompts for sampling: the first ``prefix_tokens`` real tokens of each row (half the row,
    at least 1 token, for shorter rows).  ``num`` rows, cycling over the batch if needed."""
    ids = input_ids.detach().cpu()
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    rows = [ids[b][keep[b]].tolist() for b in range(ids.shape[0])]
    rows = [r for r in rows if r]
    if not rows:
        return []
    num = len(rows) if num is None else int(num)
    out = []
    for i in range(num):
        r = rows[i % len(rows)]
        k = prefix_tokens if len(r) > prefix_tokens else max(1, len(r) // 2)
        out.append(r[:k])
    return out


def sample_trajectories(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    backspace_token_id: int,
    step: int,
    max_new_tokens: int,
    max_actions: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[list[ModelTrajectory], dict[str, float]]:
    """Sample one continuation per prompt with the current model; return trajectories + stats.

    Prompts are left-padded into batches of ``batch_size``.  Prompts and continuations are kept
    within the model's context: prompts are left-truncated to at most half of it, and a batch's
    ``max_new_tokens`` is lowered so that its longest prompt plus the continuation fits.
    Stats: ``bk_rate`` (backspaces / actions), ``mean_actions``, ``terminal_frac``.
    """
    device = next(unwrap_model(model).parameters()).device
    limit = max_positions(model)
    if limit is not None:
        prompts = [p[-max(1, limit // 2):] for p in prompts]
    trajs: list[ModelTrajectory] = []
    n_bk = n_act = n_term = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, am = left_pad(chunk, pad_token_id)
        width = ids.shape[1]
        new_tokens = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - width))
        out = generate_with_backspace(
            model, ids.to(device), am.to(device), backspace_token_id=backspace_token_id,
            max_new_tokens=new_tokens, max_actions=max_actions, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=temperature, generator=generator,
        )
        for p, acts, term, nb in zip(chunk, out.actions, out.terminal, out.num_backspaces):
            if acts:
                trajs.append(ModelTrajectory(prompt=list(p), actions=acts, terminal=term, step=step))
            n_bk += nb
            n_act += len(acts)
            n_term += int(term)
    stats = {
        "bk_rate": n_bk / max(n_act, 1),
        "mean_actions": n_act / max(len(prompts), 1),
        "terminal_frac": n_term / max(len(prompts), 1),
    }
    return trajs, stats
