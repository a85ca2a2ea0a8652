"""Split a list across processes and gather the results back in order (any world size).

Every process gets a contiguous, equally long shard (the tail is padded by repeating the last item)
so that sharded models (DeepSpeed ZeRO-3, FSDP) run the same number of forward passes on every
rank; the padding is dropped again after :func:`gather_in_order`. On a single process both are
no-ops and nothing touches ``torch.distributed``.

The collectives are ``torch.distributed``'s object collectives on the default process group (the
one ``accelerate launch`` / ``torchrun`` sets up), what ``accelerate.utils.gather_object`` uses on
GPUs; called directly so that they also work where accelerate's state reports a single process
although a group exists (e.g. ``torchrun`` on CPUs).

:func:`release_process_group` ends a launched process cleanly: a gloo group left for the interpreter
to tear down can abort the process at exit (SIGABRT, "terminate called without an active
exception") after the work is done, which the launcher reports as a failed run.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["broadcast_from_main", "gather_in_order", "process_info", "release_process_group", "shard_for_process"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def process_info() -> tuple[int, int]:
    """``(process_index, num_processes)`` of the default process group (``(0, 1)`` when there is none)."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


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
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return list(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part][:total]


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process (identity on a single process)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def release_process_group() -> None:
    """Wait for every process, then destroy the default process group (no-op without one).

    Call it once at the end of a launched program's successful path (the CLIs do): gloo's worker
    threads still hold work objects at interpreter exit otherwise, and their destruction during
    finalization aborts the process now and then, so ``torchrun``/``accelerate launch`` reports a
    finished run as failed. Not for error paths: the barrier would wait for processes that are gone.
    """
    dist = _dist()
    if dist is None:
        return
    dist.barrier()
    dist.destroy_process_group()
