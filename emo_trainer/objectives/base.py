"""The contract every training objective follows.

An objective is split in two so that the same formula serves both loss paths
(full logits, and chunked logits recomputed from hidden states):

1. ``token_stats(logits, targets, extras)`` — *per-position* statistics, each a
   differentiable fp32 tensor of shape ``(n,)`` computed from one row of logits
   (e.g. the cross-entropy ``ce``, the EMO transport cost ``demd``, the entropy
   ``entropy``).  This is the only place where logits are touched, so the chunked
   path can recompute it chunk by chunk in the backward pass.
2. ``combine(stats, valid, extras)`` — turns the statistics into the *sum* of
   per-token losses over valid positions (with any stop-gradient weights), plus
   diagnostics.  It never sees logits.

``Objective.__call__`` then divides that sum by the number of target tokens,
exactly as ``docs/objectives.md`` ("Reduction and gradient accumulation") says:

    loss = Σ_valid ℓ_i / num_items_in_batch × (world size when averaging across devices)

or the plain token mean of this micro-batch when ``num_items_in_batch`` is None.
All loss math runs in fp32, whatever the dtype of the logits.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "Objective",
    "ObjectiveOutput",
    "shift_labels",
]


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    Attributes:
        loss: scalar tensor to call ``backward()`` on (already normalised).
        metrics: diagnostics of this micro-batch as plain floats (e.g. ``{"ce": 2.3, "demd": 0.4}``);
            detached 0-d tensors when the objective's ``defer_metrics`` is set.
        num_valid: number of valid target tokens in this micro-batch (a 0-d tensor with ``defer_metrics``).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    num_valid: int = 0


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Return next-token targets aligned with the logits (HF causal-LM convention).

    ``labels`` are the *unshifted* labels (usually a copy of ``input_ids`` with −100 on
    padding).  Position ``t`` of the result is the target of the logits at position ``t``,
    i.e. ``labels[..., t + 1]``; the last position gets ``ignore_index``.  Padding the
    labels instead of slicing the logits avoids a copy of the (N×V) logits.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def check_labels(labels: Any, leading_shape: tuple[int, ...], vocab_size: int, values: bool = True,
                 what: str = "logits") -> None:
    """``labels`` must be an integer tensor of shape ``leading_shape`` (the logits' shape without the
    vocabulary axis) with values in [0, ``vocab_size``) or −100; raises one ``ValueError`` otherwise.

    A mis-shaped label tensor with the right number of elements would otherwise be reshaped into a
    loss against the wrong targets, and an out-of-range id is a device-side assert on CUDA.  The
    value check reads one boolean on the host (``values=False`` skips it: the trainer's own batches
    come from token ids the embedding has already looked up).
    """
    if not torch.is_tensor(labels):
        raise ValueError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the {what} need {tuple(leading_shape)} (the {what}' shape "
            f"without the last axis); pass the unshifted labels of the same batch, e.g. input_ids with -100 on padding"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer token ids (torch.long), got dtype {labels.dtype}")
    if values and labels.numel():
        bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab_size)
        if bool(bad.any()):
            first = labels[bad].reshape(-1)[0].item()
            raise ValueError(
                f"labels hold {int(bad.sum())} value(s) outside [0, {vocab_size}) and != {IGNORE_INDEX} (e.g. {first}); "
                f"the vocabulary has {vocab_size} entries; mark ignored positions with {IGNORE_INDEX}"
            )


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class Objective:
    """Base class of the five objectives (see the module docstring for the contract).

    Subclasses set ``name`` and implement :meth:`token_stats` and :meth:`combine`.
    Options are the keyword arguments of ``__init__`` — the config system reads them
    from the signature, so every option needs a type annotation and a default.

    Hooks used by :class:`emo_trainer.trainer.ObjectiveTrainer` (all optional):
    :meth:`setup` (once, before training: e.g. copy the EMO cost embedding, add the
    backspace token), :meth:`on_step_begin`, :meth:`state_dict` / :meth:`load_state_dict`
    (objective state that must survive a resume, stored next to the checkpoint).

    Attributes:
        average_tokens_across_devices: multiply by the world size after dividing by a
            ``num_items_in_batch`` summed over ranks (the Trainer sets this from its args).
    """

    name: ClassVar[str] = ""
    #: Per-position tensors (beyond targets) that ``token_stats`` needs, e.g. a backspace mask.
    extra_position_keys: ClassVar[tuple[str, ...]] = ()
    #: ``token_stats`` upcasts internally (fp32 math from bf16/fp16 logits): both loss paths then
    #: pass low-precision logits as they are instead of making an fp32 N×V copy first.
    fp32_math_inside: ClassVar[bool] = False
    #: ``finish`` keeps the diagnostics as detached 0-d tensors and ``num_valid`` as a 0-d tensor
    #: instead of reading them on the host: no host↔device synchronisation per micro-batch.
    #: ``ObjectiveTrainer`` sets it while it computes a training loss and reads the values when it logs.
    defer_metrics: bool = False
    #: Set by ``ObjectiveTrainer`` (when it can rescale gradients): an objective whose loss carries
    #: a stop-gradient scalar factor of the *whole step's* batch (MiLe's α) leaves it out of each
    #: micro-batch's loss and reports its parts; the trainer multiplies the accumulated gradients
    #: and the logged loss by :meth:`take_step_scale` after the step's last backward, so gradient
    #: accumulation equals the big batch exactly.
    defer_step_scale: bool = False
    #: The log key of that factor (the trainer logs its value per optimizer step).
    step_scale_name: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.average_tokens_across_devices = False

    # ------------------------------------------------------------------ formula
    def token_stats(
        self, logits: torch.Tensor, targets: torch.Tensor, extras: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-position statistics of ``logits`` (n, V) fp32 for ``targets`` (n,) in [0, V).

        With ``fp32_math_inside`` the logits may also arrive in bf16/fp16 (the model's own
        tensor, no copy); the statistics must then still be computed in fp32.

        Ignored positions carry an arbitrary valid id; :meth:`combine` masks them out.
        Every returned tensor has shape (n,) — or (n, k) for a per-position vector, e.g.
        SequenceMatch's Q of several actions — and may carry gradient to ``logits``.
        """
        raise NotImplementedError

    def combine(
        self, stats: dict[str, torch.Tensor], valid: torch.Tensor, extras: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Sum of per-token losses over ``valid`` positions, and diagnostics.

        Returns ``(loss_sum, metrics)``; ``metrics`` values may be 0-d tensors (they are
        detached and turned into floats by the caller).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Called once before training with the (unwrapped) model."""

    def on_step_begin(self, model: torch.nn.Module, step: int) -> None:
        """Called before each optimizer step's first micro-batch."""

    def take_step_scale(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The step-level factor of the micro-batches computed since the last call, reduced over
        processes, or None for objectives without one; forgets those micro-batches.  A
        collective: every process calls it at every optimizer step, also one whose micro-batches
        were all skipped (its share is then zero; ``device`` is where that zero is made).  Only
        used with ``defer_step_scale``."""
        return None

    def discard_step_part(self) -> None:
        """Forget the last micro-batch's share of the step factor (the trainer skipped it)."""

    def reset_step_scale(self) -> None:
        """Forget every share not taken yet (a step that never finished)."""

    def forward_context(self) -> AbstractContextManager:
        """Context the trainer enters around the model's training forward (and the backward that
        follows it runs the kernels chosen there); default: nothing."""
        return nullcontext()

    #: Keys of a collated batch that go to ``model(...)``; everything else goes to the loss.
    model_input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

    def split_batch(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split a collated batch into ``(model_inputs, loss_inputs)``.

        ``loss_inputs`` must hold ``labels`` (unshifted, −100 ignored) and any extras the
        objective needs.  SequenceMatch overrides this to add backspace augmentation,
        position ids = depth and the 4-D ancestor mask.
        """
        model_inputs = {k: v for k, v in batch.items() if k in self.model_input_keys}
        loss_inputs = {k: v for k, v in batch.items() if k not in self.model_input_keys}
        return model_inputs, loss_inputs

    def count_items(self, batch: dict[str, Any]) -> torch.Tensor:
        """Valid target tokens of one collated micro-batch (what ``num_items_in_batch`` sums)."""
        return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()

    def state_dict(self) -> dict[str, Any]:
        """Objective state that a resumed run must get back (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def options(self) -> dict[str, Any]:
        """The options this objective was built with (for logs and saved configs)."""
        return {}

    # ------------------------------------------------------------------ driver
    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        **extras: Any,
    ) -> ObjectiveOutput:
        """Loss from full logits ``(..., T, V)`` and unshifted HF labels ``(..., T)``.

        ``extras`` are objective-specific batch tensors (e.g. SequenceMatch's weights);
        those named in ``extra_position_keys`` (when present) are flattened to (n, ...) and passed
        to ``token_stats``.
        """
        if not torch.is_tensor(logits) or logits.dim() < 2:
            raise ValueError(f"logits must be a tensor (..., T, V), got {getattr(logits, 'shape', type(logits).__name__)}")
        # the trainer (defer_metrics) skips the host read of the value check: its labels are token ids
        check_labels(labels, logits.shape[:-1], logits.shape[-1], values=not self.defer_metrics)
        targets = shift_labels(labels).reshape(-1)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if not (self.fp32_math_inside and flat_logits.dtype in (torch.bfloat16, torch.float16)):
            flat_logits = flat_logits.float()
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)
        pos_extras = {
            k: extras[k].reshape(-1, *extras[k].shape[labels.dim():]) for k in self.extra_position_keys if k in extras
        }
        stats = self.token_stats(flat_logits, safe_targets, pos_extras)
        return self.finish(stats, valid, num_items_in_batch, extras)

    def finish(
        self,
        stats: dict[str, torch.Tensor],
        valid: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None,
        extras: dict[str, Any] | None = None,
    ) -> ObjectiveOutput:
        """Combine statistics and reduce (shared by the full-logit and chunked paths)."""
        loss_sum, metrics = self.combine(stats, valid, extras or {})
        if self.defer_metrics:  # no host read: tensors stay where they are (see ``defer_metrics``)
            n_valid = valid.sum()
            out_metrics = {k: (v.detach() if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}
        else:
            n_valid = int(valid.sum())
            out_metrics = {k: (float(v.detach()) if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}
        loss = reduce_loss(loss_sum, n_valid, num_items_in_batch, self.average_tokens_across_devices)
        return ObjectiveOutput(loss=loss, metrics=out_metrics, num_valid=n_valid)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def reduce_loss(
    loss_sum: torch.Tensor,
    n_valid: int | torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None,
    average_tokens_across_devices: bool = False,
) -> torch.Tensor:
    """Normalise a summed loss the way ``docs/objectives.md`` prescribes.

    With ``num_items_in_batch`` (valid targets of all micro-batches of the optimizer step,
    summed over ranks when averaging across devices) the result is
    ``loss_sum / num_items_in_batch`` (× world size when averaging across devices, because
    DDP averages gradients over ranks).  Without it, the token mean of this micro-batch.
    A micro-batch without valid targets gives a differentiable zero.
    """
    if num_items_in_batch is None:
        if torch.is_tensor(n_valid):  # a 0-d count (``defer_metrics``): same quotient, no host read
            return loss_sum / n_valid.clamp_min(1)
        return loss_sum / max(n_valid, 1)
    if torch.is_tensor(num_items_in_batch):
        denom = num_items_in_batch.to(loss_sum.device, torch.float32).clamp_min(1.0)
    else:
        denom = max(float(num_items_in_batch), 1.0)
    loss = loss_sum / denom  # a step with no target at all gives 0, not 0/0
    if average_tokens_across_devices:
        loss = loss * _world_size()
    return loss


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over valid positions (0 when there are none), detached; for diagnostics."""
    n = valid.sum()
    x = x.detach()
    return torch.where(valid, x, torch.zeros_like(x)).sum() / n.clamp_min(1)


def is_finite_number(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
