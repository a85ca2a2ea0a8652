"""Split a list across processes and gather the results back in order (accelerate, any world size).

Every process gets a contiguous, equally long shard (the tail is padded by repeating the last item)
so that sharded models (DeepSpeed ZeRO-3, FSDP) run the same number of forward passes on every
rank; the padding is dropped again after :func:`gather_in_order`. On a single process both are
no-ops and nothing touches ``torch.distributed``.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["broadcast_from_main", "gather_in_order", "process_info", "shard_for_process"]


def process_info() -> tuple[int, int]:
    """``(process_index, num_processes)`` from accelerate's :class:`PartialState` (``(0, 1)`` if not distributed)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
    except ImportError:  # pragma: no cover - torch always has it
        return 0, 1
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def shard_for_process(items: list[T]) -> list[T]:
    """This process's contiguous shard of ``items``, padded to ``ceil(len / world)`` items."""
    rank, world = process_info()
    if world == 1 or not items:
        return list(items)
    per = math.ceil(len(items) / world)
    shard = list(items[rank * per : (rank + 1) * per])
    return shard + [items[-1]] * (per - len(shard))


def gather_in_order(local: list[Any], total: int) -> list[Any]:
    """Inverse of :func:`shard_for_process`: every process gets the ``total`` results in the original order."""
    _, world = process_info()
    if world == 1:
        return list(local)
    from accelerate.utils import gather_object

    return list(gather_object(list(local)))[:total]


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process (identity on a single process)."""
    _, world = process_info()
    if world == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]
