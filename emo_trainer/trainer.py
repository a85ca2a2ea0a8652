"""``ObjectiveTrainer``: a ``transformers.Trainer`` whose loss is one of the registered objectives.

What it adds to the stock Trainer:

- ``compute_loss`` dispatches to the objective (full logits or the chunked hidden-state path)
  and reduces by ``num_items_in_batch`` exactly as ``docs/objectives.md`` prescribes, so gradient
  accumulation of k micro-batches equals one k-times larger batch, and n processes equal one
  process with an n-times larger batch.
- The objective's diagnostics (e.g. ``demd``, ``alpha``) are averaged over the logging window
  and merged into the Trainer's logs (TRL's ``_metrics`` pattern).
- Evaluation loss is always plain cross-entropy, token-weighted over the whole eval set
  (Σ NLL / Σ tokens), logged as ``eval_loss`` and ``eval_perplexity`` for every objective.
- Objective state (EMO's cost embedding, SequenceMatch's replay buffer) is saved in every
  checkpoint and restored on ``resume_from_checkpoint``; a checkpoint is marked complete only
  after everything is written, and resuming skips incomplete ones.
- A non-finite loss stops the run with a message naming step, objective and term (or skips
  the micro-batch and counts it, with ``on_nonfinite="skip"``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .errors import CheckpointError
from .objectives import Objective, ObjectiveError, chunked_objective_loss, get_objective, shift_labels
from .objectives.base import IGNORE_INDEX

logger = logging.getLogger(__name__)

OBJECTIVE_STATE_TENSORS = "objective_state.safetensors"
OBJECTIVE_STATE_JSON = "objective_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Config attributes that transform logits after the lm_head; the chunked path cannot apply them.
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


#: With ``on_nonfinite="skip"``, this many non-finite micro-batches in a row (or 3 optimizer
#: steps' worth, if more) stop the run: the model has diverged, and every later batch would be
#: skipped too while a NaN model is saved as the result.
MIN_CONSECUTIVE_SKIPS = 10


class NonFiniteLossError(FloatingPointError):
    """Raised when an objective produces a NaN/Inf loss and ``on_nonfinite='raise'``."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint (or the final model) failed, e.g. a full disk; the message names the
    last complete checkpoint, which is untouched."""


class ObjectiveTrainer(Trainer):
    """Trainer for causal LMs with a configurable training objective.

    Args:
        objective: a registered name (``"mle"``, ``"emo"``, ``"mixce"``, ``"mile"``,
            ``"sequencematch"``, ``"dft"``, ``"tailr"``, ``"focal"``, ``"eaft"``) or an :class:`~emo_trainer.objectives.Objective` instance.
        objective_options: options of a named objective (ignored for an instance).
        loss_path: ``"full"`` (logits, fastest) or ``"chunked"`` (hidden states in token chunks,
            recomputed in backward; never holds N×V logits).
        chunk_size: tokens per chunk on the chunked path.
        on_nonfinite: ``"raise"`` or ``"skip"`` for a non-finite loss.
        model_is_fresh: the model's weights are random (built from a config); objectives that
            read the starting weights (EMO ``initial``) warn.
        **kwargs: everything ``transformers.Trainer`` accepts (``model``, ``args``,
            ``train_dataset``, ``eval_dataset``, ``data_collator``, ``processing_class``,
            ``callbacks``...).
    """

    def __init__(
        self,
        *args: Any,
        objective: str | Objective = "mle",
        objective_options: dict | None = None,
        loss_path: str = "full",
        chunk_size: int = 2048,
        on_nonfinite: str = "raise",
        model_is_fresh: bool = False,
        **kwargs: Any,
    ) -> None:
        if loss_path not in ("full", "chunked"):
            raise ValueError(f"loss_path must be 'full' or 'chunked', got {loss_path!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.objective = objective if isinstance(objective, Objective) else get_objective(objective, **(objective_options or {}))
        self.loss_path = loss_path
        self.chunk_size = chunk_size
        self.on_nonfinite = on_nonfinite
        self._eval_objective = get_objective("mle")
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_sums: list[float] = [0.0, 0.0]
        self._skipped_batches = 0
        self._consecutive_skips = 0  # on_nonfinite="skip": micro-batches skipped in a row
        self._deferred_metrics = 0  # micro-batches whose diagnostics are still device tensors
        self._objective_state_loaded = False
        super().__init__(*args, **kwargs)
        # We normalise by num_items_in_batch ourselves: make the Trainer count it for every model
        # and not divide our (already GA-correct) loss by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.objective.average_tokens_across_devices = bool(self.args.average_tokens_across_devices)
        self.objective.model_is_fresh = model_is_fresh
        # A step-level factor (MiLe's α) is applied to the accumulated gradients after the step's
        # last backward (training_step): exact gradient accumulation.  DeepSpeed owns the
        # gradients, so there each micro-batch keeps its own factor.
        # (``defer_step_scale`` is on only inside ``training_step``: a direct call of the objective,
        # e.g. by a callback, still forms its factor per call.)
        self._step_scale = self.objective.step_scale_name is not None and not getattr(self, "is_deepspeed_enabled", False)
        self._step_loss = None  # Σ of this step's micro-batch losses so far (with a step scale)
        try:
            self.objective.setup(self._unwrapped(self.model), self.processing_class)
        except ObjectiveError:
            raise
        except ValueError as e:  # e.g. an EMO cost embedding of the wrong vocabulary size: a user error
            raise ObjectiveError(str(e)) from e
        self.add_callback(_ObjectiveHooks(self))

    # ------------------------------------------------------------------ helpers
    def _unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        m = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        if hasattr(m, "get_base_model"):  # peft
            m = m.get_base_model()
        return m

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their target tokens.

        The count uses ``objective.count_items`` (shifted labels ≠ −100 for token objectives),
        summed over processes when ``average_tokens_across_devices``; this does not depend on
        how a given transformers release counts.
        """
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and isinstance(batch_samples[0], dict) and "labels" in batch_samples[0]:
            n = sum(int(self.objective.count_items(b)) for b in batch_samples)
            num_items = torch.tensor(n, device=device, dtype=torch.long)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return self._eval_loss(model, inputs, return_outputs)
        model_inputs, loss_inputs = self.objective.split_batch(model, inputs)
        labels = loss_inputs.pop("labels")
        outputs = None
        deferred = self.objective.defer_metrics
        self.objective.defer_metrics = True  # diagnostics stay on the device until `log` reads them
        try:
            if self.loss_path == "chunked" and self._chunked_supported(model):
                with _hidden_states_as_logits(self._unwrapped(model)), self.objective.forward_context():
                    outputs = model(**model_inputs, use_cache=False)
                head = self._unwrapped(model).get_output_embeddings()
                out = chunked_objective_loss(
                    self.objective, outputs.logits, head.weight, labels, num_items_in_batch,
                    bias=getattr(head, "bias", None), chunk_size=self.chunk_size, **loss_inputs,
                )
            else:
                with self.objective.forward_context():
                    outputs = model(**model_inputs, use_cache=False)
                out = self.objective(outputs.logits, labels, num_items_in_batch, **loss_inputs)
        finally:
            self.objective.defer_metrics = deferred
        loss = out.loss
        if not torch.isfinite(loss.detach()).all():
            loss = self._handle_nonfinite(model, out)
        else:
            self._consecutive_skips = 0
        window = self._metrics["train"]
        for k, v in out.metrics.items():
            window[k].append(v)
        self._deferred_metrics += 1
        if self._deferred_metrics >= _MAX_DEFERRED:
            # a long window without a log (logging_steps large or logging off): read the values now,
            # once per _MAX_DEFERRED micro-batches, instead of keeping thousands of device scalars
            for k, floats in _read_window(window).items():
                window[k] = floats
            self._deferred_metrics = 0
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._step_scale:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._stop_if_diverged()
            return loss
        self.objective.defer_step_scale = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.objective.defer_step_scale = False
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if self.accelerator.sync_gradients:  # the step's last micro-batch: its backward is done
            scale = self.objective.take_step_scale(self.args.device)
            if scale is not None:
                # One host read per optimizer step; a Python float keeps α exact for bf16 grads
                # (the product is formed in fp32) and lives on no device.
                value = float(scale)
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(value)
                # The Trainer logs the sum of what this returns over the step: make it scale × Σ.
                loss = loss + (value - 1.0) * self._step_loss
                self._metrics["train"][self.objective.step_scale_name].append(value)
            self._step_loss = None
        self._stop_if_diverged()
        return loss

    def _stop_if_diverged(self) -> None:
        """``on_nonfinite="skip"``: stop when the model has diverged (every micro-batch non-finite for
        a while).  Decided at the end of each optimizer step, on every process together (the
        largest run of skips over processes), so no process is left waiting in a collective."""
        if self.on_nonfinite != "skip" or not self.accelerator.sync_gradients:
            return
        run = self._consecutive_skips
        dist = torch.distributed
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([run], device=self.args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            run = int(t[0])
        limit = max(MIN_CONSECUTIVE_SKIPS, 3 * self.args.gradient_accumulation_steps)
        if run >= limit:  # not a bad batch: the model itself has diverged
            raise NonFiniteLossError(
                f"non-finite loss in {run} micro-batches in a row up to step {self.state.global_step}, objective "
                f"'{self.objective.name}': the model has diverged, skipping cannot help; restart from the last "
                f"checkpoint with a lower learning rate or gradient clipping (training.max_grad_norm)"
            )

    def _handle_nonfinite(self, model, out):
        bad = [k for k, v in out.metrics.items() if not math.isfinite(float(v))]
        where = f"step {self.state.global_step}, objective '{self.objective.name}'"
        term = f"non-finite term(s): {', '.join(bad)}" if bad else "non-finite total loss"
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"non-finite loss at {where} ({term}). Lower the learning rate, keep loss math in fp32, "
                f"or set objective.on_nonfinite: skip to drop such batches."
            )
        self._skipped_batches += 1
        self._consecutive_skips += 1  # _stop_if_diverged checks it at the end of the step
        self.objective.discard_step_part()
        logger.warning("skipping a micro-batch with a non-finite loss at %s (%s)", where, term)
        # A zero that touches every trainable parameter: no gradient, no DDP 'unused parameter' error.
        return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)

    def _chunked_supported(self, model) -> bool:
        m = self._unwrapped(model)
        head = m.get_output_embeddings()
        reason = None
        if not isinstance(head, torch.nn.Linear):
            reason = (f"the output head is a {type(head).__module__}.{type(head).__name__} (e.g. peft's LoRA or "
                      f"modules_to_save wrapper), not a torch.nn.Linear")
        elif any(getattr(m.config, a, None) not in (None, 1.0) for a in _POST_HEAD_ATTRS):
            reason = "the model transforms logits after its head (soft-capping/scaling)"
        elif (
            getattr(self, "is_fsdp_enabled", False)  # decided the same on every rank, FSDP1 or 2
            or hasattr(head.weight, "_local_tensor")  # DTensor (FSDP2 / tensor parallel)
            or getattr(head.weight, "ds_numel", None) is not None  # DeepSpeed ZeRO-3
            or head.weight.numel() == 0
        ):
            reason = "the head weight is sharded (FSDP/DeepSpeed ZeRO-3)"
        if reason:
            if not getattr(self, "_warned_chunk_fallback", False):
                logger.warning("loss_path=chunked falls back to full logits: %s", reason)
                self._warned_chunk_fallback = True
            return False
        return True

    def _eval_loss(self, model, inputs, return_outputs):
        """Plain CE on clean text whatever the objective; accumulates Σ NLL and Σ tokens."""
        model_inputs = {k: v for k, v in inputs.items() if k in Objective.model_input_keys}
        labels = inputs["labels"]
        outputs = model(**model_inputs, use_cache=False)
        logits = outputs.logits
        transform = getattr(self.objective, "eval_logits_transform", None)
        if transform is not None:
            logits = transform(logits)
        # Per-row sums, gathered with ``gather_for_metrics``: with several processes the last
        # batch is padded with repeated samples (accelerate's even batches), which it drops —
        # for datasets with a length (an IterableDataset's remainder is unknown to accelerate).
        targets = shift_labels(labels)
        valid = targets != IGNORE_INDEX
        flat = logits.reshape(-1, logits.shape[-1])
        ce = self._eval_objective.token_stats(flat, targets.masked_fill(~valid, 0).reshape(-1))["ce"]
        nll = torch.where(valid, ce.view(targets.shape), torch.zeros((), dtype=ce.dtype, device=ce.device))
        row_nll = nll.reshape(nll.shape[0], -1).sum(1, dtype=torch.float64)
        row_n = valid.reshape(valid.shape[0], -1).sum(1)
        loss = (row_nll.sum() / row_n.sum().clamp_min(1)).float()  # this batch's token mean (this process)
        if self.args.world_size > 1:
            row_nll, row_n = self.accelerator.gather_for_metrics((row_nll, row_n))
        self._eval_sums[0] += float(row_nll.sum())
        self._eval_sums[1] += int(row_n.sum())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Only the loss is needed for language modelling; never return N×V logits to the eval loop.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        self._eval_sums = [0.0, 0.0]
        output = super().evaluation_loop(*args, **kwargs)
        nll, n = self._eval_sums  # already over every process (gathered batch by batch)
        if n > 0:
            ce = nll / n
            output.metrics[f"{prefix}_loss"] = ce
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(ce, 700.0))
            output.metrics[f"{prefix}_tokens"] = int(n)
        return output

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        window = self._metrics["train"]
        if mode != "train" and any(torch.is_tensor(x) for v in window.values() for x in v):
            # Not a training log (e.g. the end-of-training summary): keep the window for the next
            # one, but as floats — a subclass's log (TRL's) may average it into these logs.
            for k, floats in _read_window(window).items():
                window[k] = floats
            self._deferred_metrics = 0
        if mode == "train":
            merged = _window_means(self._metrics["train"])
            logs.update({k: v for k, v in merged.items() if k not in logs})
            if self._skipped_batches:
                logs["skipped_batches"] = self._skipped_batches
            self._metrics["train"].clear()
            self._deferred_metrics = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """Save as usual, then the objective state, then a completion marker; rotate last.

        Old checkpoints are deleted only after the new one is complete, so a crash while
        writing never leaves the run without a good checkpoint.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        run_dir = self._get_output_dir(trial=trial)
        ckpt = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if self.args.should_save:
                save_objective_state(self.objective, ckpt)
                with open(os.path.join(ckpt, COMPLETE_MARKER), "w") as fh:
                    json.dump({"global_step": self.state.global_step, "objective": self.objective.name}, fh)
        except OSError as e:  # a full disk, a directory made read-only meanwhile...
            if isinstance(e, CheckpointSaveError):
                raise
            try:  # a marker cut short by the failure must not make the checkpoint look complete
                Path(ckpt, COMPLETE_MARKER).unlink(missing_ok=True)
            except OSError:
                pass
            raise CheckpointSaveError(save_failure_message(ckpt, e)) from e
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if limit is not None and self.args.should_save:
            _rotate(self, run_dir, limit)

    def train(self, resume_from_checkpoint: str | bool | None = None, allow_objective_change: bool = False, **kwargs):
        """``Trainer.train`` that also restores the objective's state from the checkpoint.

        ``resume_from_checkpoint=True`` picks the last *complete* checkpoint in ``output_dir``.
        A checkpoint written with another objective is refused (``ValueError``) unless
        ``allow_objective_change``: then the weights, optimizer, scheduler and step carry over and
        this objective starts from its own initial state (the old objective's state is not read).
        """
        resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir, require_complete=False)
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint)
            old = checkpoint_objective(path)
            if old is not None and old != self.objective.name:
                if not allow_objective_change:
                    raise CheckpointError(objective_change_message(path, old, self.objective.name))
                logger.warning("resuming %s (trained with objective '%s') with objective '%s': weights, optimizer, "
                               "scheduler and step carry over; '%s' starts from its initial state", path, old,
                               self.objective.name, self.objective.name)
            else:
                load_objective_state(self.objective, path)
        self.objective.reset_step_scale()  # nothing left over from an interrupted step
        self._step_loss = None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _ObjectiveHooks(TrainerCallback):
    """Calls the objective's per-step hook (EMO ``live`` cost, SequenceMatch buffer refill)."""

    def __init__(self, trainer: ObjectiveTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t.objective.on_step_begin(t._unwrapped(t.model), state.global_step)


# --------------------------------------------------------------------------- helpers
#: deferred (device) metric values kept per key before they are read in one transfer
_MAX_DEFERRED = 512


def _read_window(metrics: dict[str, list]) -> dict[str, list[float]]:
    """The window's values as floats: detached 0-d tensors (``Objective.defer_metrics``) are read
    with one host transfer per device, as the same floats ``float(t)`` would give (float64 holds
    every fp32/bf16/int value exactly)."""
    tensors = [x for v in metrics.values() for x in v if torch.is_tensor(x)]
    read: dict[int, float] = {}
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for x in tensors:
        by_device[x.device].append(x)
    for xs in by_device.values():
        for x, f in zip(xs, torch.stack([x.detach().reshape(()).double() for x in xs]).tolist()):
            read[id(x)] = f
    return {k: [read[id(x)] if torch.is_tensor(x) else float(x) for x in v] for k, v in metrics.items()}


def _window_means(metrics: dict[str, list]) -> dict[str, float]:
    """Mean of each metric over the logging window (see :func:`_read_window`)."""
    return {k: sum(v) / len(v) for k, v in _read_window(metrics).items() if v}


def _rotate(trainer: Trainer, run_dir: str, limit: int) -> None:
    """Keep the newest ``limit`` checkpoints (by step; the best one is kept too).

    Recent transformers (5.23 here) have the function ``trainer_utils.rotate_checkpoints``; older ones
    the method ``Trainer._rotate_checkpoints``.
    """
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:
        trainer._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
        return
    rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)


@contextmanager
def _hidden_states_as_logits(model: torch.nn.Module):
    """Make the model return its final hidden states in ``.logits`` (the head becomes identity).

    The forward still goes through every wrapper (DDP/FSDP/compile), so gradient hooks fire;
    the chunked loss then applies the head weight itself, chunk by chunk.
    """
    head = model.get_output_embeddings()
    head.forward = lambda x: x  # instance attribute shadows the class method
    try:
        yield
    finally:
        del head.forward


def save_objective_state(objective: Objective, directory: str | os.PathLike) -> None:
    """Write ``objective.state_dict()``: tensors as safetensors, the rest as JSON (no pickle)."""
    from safetensors.torch import save_file

    state = objective.state_dict()
    if not state:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    rest = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(directory / OBJECTIVE_STATE_TENSORS))
    with open(directory / OBJECTIVE_STATE_JSON, "w") as fh:
        json.dump({"objective": objective.name, "tensors": sorted(tensors), "state": rest}, fh)


def load_objective_state(objective: Objective, directory: str | os.PathLike) -> bool:
    """Restore what :func:`save_objective_state` wrote; returns False when there is nothing."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / OBJECTIVE_STATE_JSON
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("objective") != objective.name:
        raise ValueError(
            f"checkpoint {directory} was written with objective '{meta.get('objective')}', "
            f"but this run uses '{objective.name}'"
        )
    state = dict(meta.get("state", {}))
    if meta.get("tensors"):
        state.update(load_file(str(directory / OBJECTIVE_STATE_TENSORS)))
    objective.load_state_dict(state)
    return True


def checkpoint_objective(checkpoint: str | os.PathLike) -> str | None:
    """The objective a checkpoint was written with (its completion marker), or None if unknown."""
    for name in (COMPLETE_MARKER, OBJECTIVE_STATE_JSON):
        f = Path(checkpoint) / name
        if f.is_file():
            try:
                found = json.loads(f.read_text()).get("objective")
            except (ValueError, OSError, AttributeError):
                continue
            if found:
                return found
    return None


def objective_change_message(checkpoint, old: str, new: str) -> str:
    return (f"--resume_from_checkpoint: {checkpoint} was trained with objective '{old}', this run asks for '{new}'; "
            f"resume with --objective {old}, or pass --allow_objective_change to go on with '{new}' (weights, "
            f"optimizer, scheduler and step carry over; '{new}' starts from its initial state, '{old}''s is dropped)")


def save_failure_message(checkpoint: str | os.PathLike, err: OSError) -> str:
    """One line for a checkpoint (or final model) that could not be written: what failed, and the
    last complete checkpoint, which is untouched."""
    checkpoint = Path(checkpoint)
    last = last_complete_checkpoint(checkpoint.parent)
    reason = f"{type(err).__name__}: {err.strerror or err}" if isinstance(err, OSError) else str(err)
    keep = (f"the last complete checkpoint is {last}: free space (or fix the directory) and resume with "
            f"--resume_from_checkpoint true" if last else "no complete checkpoint was written before it")
    return f"could not write {checkpoint} ({reason}); {keep}"


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest ``checkpoint-N`` in ``output_dir`` that has its completion marker."""
    d = Path(output_dir)
    if not d.is_dir():
        return None
    found = []
    for p in d.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def resolve_checkpoint(value, output_dir: str | os.PathLike, *, require_complete: bool = True) -> str | None:
    """A ``resume_from_checkpoint`` value as the checkpoint directory to resume from, or None.

    None/False/``"false"``/``"none"``/``""``: None (a fresh start).  True/``"true"``/``"last"``: the
    last *complete* checkpoint (with its ``checkpoint_complete.json``) in ``output_dir``.  A path:
    checked to be a directory and, with ``require_complete``, to carry the completion marker.
    Raises :class:`~emo_trainer.errors.CheckpointError` with the fix in the message.  The CLI calls
    it before loading any data or model (a wrong path fails in a second); ``ObjectiveTrainer.train``
    calls it too, for library users.
    """
    if value is None or value is False or str(value).lower() in ("false", "none", ""):
        return None
    if value is True or str(value).lower() in ("true", "last"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"--resume_from_checkpoint true: no complete checkpoint in {output_dir} (nothing to resume); "
                f"start without --resume_from_checkpoint or point it at a checkpoint-N folder"
            )
        return found
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint: {path} is not a directory (expected .../checkpoint-N)")
    if require_complete and not (path / COMPLETE_MARKER).exists():
        raise CheckpointError(
            f"--resume_from_checkpoint: {path} is incomplete (no {COMPLETE_MARKER}: the run died while writing it); "
            f"use an earlier checkpoint, or --resume_from_checkpoint true for the last complete one"
        )
    return str(path)
