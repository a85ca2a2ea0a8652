"""Generation metrics at every evaluation, as a ``TrainerCallback`` (``docs/evaluation.md``).

:class:`GenerationEvalCallback` works on :class:`~emo_trainer.trainer.ObjectiveTrainer` (which
installs it from the ``eval:`` config) and on a stock ``transformers.Trainer`` or a TRL trainer
training any causal LM::

    cb = build_generation_callback(EvalConfig(mauve_featurizer="hashing"), eval_documents, tokenizer,
                                   trainer=trainer)          # builds the prompts and installs itself
    # or, TRL style:
    cb = GenerationEvalCallback(prompts, eval_config, tokenizer, trainer=trainer)
    trainer.add_callback(cb)

At each ``on_evaluate`` (every ``eval_steps`` and at the end of training) it samples one
continuation per prompt (for each seed in ``eval.seeds``), computes MAUVE and the
repetition/diversity metrics, and optionally the exact token-weighted perplexity; it puts them
into the evaluation's ``metrics`` dict under the evaluation's prefix — so ``evaluate()`` returns
them and ``metric_for_best_model="eval_mauve"`` and early stopping see them — and logs them
through ``trainer.log`` so that ``state.log_history``, TensorBoard, W&B and the JSON state get them.

Logged keys (prefix ``eval_``): ``perplexity`` (if computed here), ``mauve``,
``mauve_num_samples``, ``rep_2``, ``rep_3``, ``rep_4``, ``diversity``, ``seq_rep_4``,
``distinct_1``, ``distinct_2``, ``mean_length`` (whitespace words per continuation), each also as
``<key>_std`` when several seeds are configured, and the same keys for each extra decoding setting
of ``eval.decodings`` under its name (``top_p0.95_mauve``, ...); ``generation_runtime`` and ``mauve_runtime``
(seconds); and once, at the first evaluation, the human baseline on the reference continuations:
``ref_rep_2`` ... ``ref_mean_length``.

With a dict of eval datasets, ``Trainer.evaluate`` calls ``on_evaluate`` once per dataset and the
generation metrics (which do not depend on the eval dataset) are computed for each: nothing is
cached between calls, because the weights can change without a training step (e.g.
``load_best_model_at_end`` loads another checkpoint into the same model object).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import TrainerCallback

from .config import EvalConfig
from .generation import Sampler, generate_continuations
from .metrics.mauve import (
    RECOMMENDED_SAMPLES,
    FeatureCache,
    Featurizer,
    check_sample_count,
    compute_mauve,
    featurize,
    get_featurizer,
)
from .metrics.perplexity import dataloader_nll, perplexity_from_totals
from .metrics.repetition import repetition_metrics
from .prompts import Prompt, build_prompts
from .sharding import broadcast_from_main, process_info

logger = logging.getLogger(__name__)

__all__ = ["GenerationEvalCallback", "aggregate_seeds", "build_generation_callback"]


def aggregate_seeds(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of every key; with two or more seeds also ``<key>_std`` (sample std, ddof = 1).
    A key missing from some seeds' dicts is averaged over the seeds that have it."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in per_seed for k in m):
        values = np.array([m[key] for m in per_seed if key in m], dtype=np.float64)
        out[key] = float(values.mean())
        if len(values) > 1 and key != "mauve_num_samples":
            out[f"{key}_std"] = float(values.std(ddof=1))
    if "mauve_num_samples" in out:
        out["mauve_num_samples"] = int(out["mauve_num_samples"])
    return out


def _metric_prefix(metrics: dict[str, Any]) -> str:
    # Trainer.evaluate always adds "<prefix>_runtime" (speed_metrics); "eval" for a plain evaluate().
    for key in metrics:
        if key.endswith("_runtime") and not key.endswith(("generation_runtime", "mauve_runtime")):
            return key[: -len("_runtime")]
    for key in metrics:
        if key.endswith("_loss"):
            return key[: -len("_loss")]
    return "eval"


class GenerationEvalCallback(TrainerCallback):
    """Sampled-continuation metrics (MAUVE, repetition, diversity) and token-weighted perplexity per evaluation.

    Args:
        prompts: :class:`~emo_trainer.evaluation.prompts.Prompt` pairs (prefix, reference continuation),
            e.g. from :func:`~emo_trainer.evaluation.prompts.build_prompts`.
        eval_config: the ``eval:`` options (defaults: :class:`EvalConfig`).
        tokenizer: used for generation; defaults to the trainer's ``processing_class``.
        trainer: the trainer, so the metrics are logged through ``trainer.log`` (all loggers).
            Without it they still go into the returned metrics and ``state.log_history``, but
            not to TensorBoard/W&B; :meth:`install` sets it.
        compute_perplexity: compute ``<prefix>_perplexity`` = exp(Σ NLL / Σ tokens) with one pass
            over the eval dataloader, unless the trainer already reported it (ObjectiveTrainer
            does). A stock ``Trainer``'s ``eval_loss`` is a mean of batch means, not this.
        sampler: replaces :func:`~emo_trainer.evaluation.generation.sample_continuations` (e.g. a
            backspace-aware sampler); same signature.
        featurizer: a ready :class:`~emo_trainer.evaluation.metrics.mauve.Featurizer`, instead of building
            one from ``eval_config.mauve_featurizer``.
        perplexity_vocab_size: restrict the perplexity softmax to the first N logits (a model
            with extra actions beyond the vocabulary, e.g. SequenceMatch's backspace).
        reference_features: MAUVE's p features (prefix + human continuation of each prompt) made
            earlier with the same featurizer, e.g. cached on disk across models; else computed once.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        eval_config: EvalConfig | None = None,
        tokenizer: Any = None,
        *,
        trainer: Any = None,
        compute_perplexity: bool = True,
        sampler: Sampler | None = None,
        featurizer: Featurizer | None = None,
        perplexity_vocab_size: int | None = None,
        reference_features: np.ndarray | None = None,
    ):
        self.config = eval_config or EvalConfig()
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.compute_perplexity = compute_perplexity
        self.sampler = sampler
        self.perplexity_vocab_size = perplexity_vocab_size
        if not self.config.seeds:
            raise ValueError("eval.seeds: give at least one sampling seed")
        if self.generation_enabled and self.config.mauve:
            # Fail at construction, not at the first evaluation hours into training.
            check_sample_count(len(self.prompts), len(self.prompts))
        self._featurizer = featurizer
        self._feature_cache = FeatureCache()
        if reference_features is not None:
            if len(reference_features) != len(self.prompts):
                raise ValueError(f"reference_features has {len(reference_features)} rows for {len(self.prompts)} prompts")
            self._feature_cache.put(self.featurizer, [p.human_text for p in self.prompts],
                                    np.asarray(reference_features, dtype=np.float32))
        self._reference_logged = False
        self._warned_no_trainer = False
        #: The continuations of the last evaluation: {(decoding name, seed): texts} ("" = main setting).
        self.last_continuations: dict[tuple[str, int], list[str]] = {}

    # ------------------------------------------------------------------ setup

    @property
    def generation_enabled(self) -> bool:
        return bool(self.config.generation and self.prompts)

    def install(self, trainer: Any) -> GenerationEvalCallback:
        """Attach to ``trainer``: log through it, and run right after ``DefaultFlowCallback`` so that
        every other callback's ``on_evaluate`` (early stopping, ...) already sees these metrics."""
        from transformers.trainer_callback import DefaultFlowCallback

        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [cb for cb in callbacks if cb is not self]
        pos = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(pos, self)
        return self

    @property
    def featurizer(self) -> Featurizer:
        if self._featurizer is None:
            c = self.config
            self._featurizer = get_featurizer(
                c.mauve_featurizer, c.mauve_max_text_length, c.featurizer_batch_size, c.mauve_pooling,
                c.mauve_device,
            )
        return self._featurizer

    # ------------------------------------------------------------------ metrics

    def reference_metrics(self) -> dict[str, float]:
        """Repetition/diversity of the human reference continuations (the baseline), keys ``ref_*``."""
        return {f"ref_{k}": v for k, v in repetition_metrics([p.reference for p in self.prompts]).items()}

    def _check_featurizer(self, model: Any) -> None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if name and name == self.config.mauve_featurizer:
            warnings.warn(
                f"eval.mauve_featurizer is '{name}', the checkpoint this model started from: a frozen copy is "
                "used (never the weights being trained), but MAUVE is then measured in the initial model's "
                "feature space; the papers use a separate fixed model (gpt2-large).",
                UserWarning,
                stacklevel=3,
            )

    def generation_metrics(self, model: Any, tokenizer: Any = None) -> dict[str, float]:
        """Sample, then score: the metrics of one evaluation, without prefix (mean/std over seeds).

        The main decoding setting gives ``mauve``, ``rep_2``, ...; each of ``eval.decodings`` gives
        the same keys under its name (``top_p0.95_mauve``, ...).  Collective under ``accelerate``:
        every process must call it (each samples and featurizes a shard); every process gets the
        same numbers.
        """
        start = time.perf_counter()
        per_seed = self.per_seed_metrics(model, tokenizer)
        mauve_time = sum(m.pop(k) for m in per_seed for k in [k for k in m if k.endswith("mauve_runtime")])
        out = aggregate_seeds(per_seed)
        out["generation_runtime"] = round(time.perf_counter() - start, 4)
        if self.config.mauve:
            out["mauve_runtime"] = round(mauve_time, 4)
        return out

    def per_seed_metrics(self, model: Any, tokenizer: Any = None) -> list[dict[str, float]]:
        """One dict of metrics per sampling seed (``eval.seeds``), each decoding setting's keys under
        its name, with their ``mauve_runtime``.  The texts are kept in :attr:`last_continuations`,
        keyed by (decoding name, seed)."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("GenerationEvalCallback needs a tokenizer (pass tokenizer= or give the trainer one)")
        c = self.config
        prefixes = [p.prefix for p in self.prompts]
        per_seed = []
        self.last_continuations = {}
        for seed in c.seeds:
            metrics: dict[str, float] = {}
            for d in c.decoding_settings():
                dc = dataclasses.replace(c, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
                continuations = generate_continuations(model, tokenizer, prefixes, dc, seed=seed, sampler=self.sampler)
                self.last_continuations[(d.name, seed)] = continuations
                m = repetition_metrics(continuations)
                if c.mauve:
                    t0 = time.perf_counter()
                    m.update(self.mauve_metrics(continuations))
                    m["mauve_runtime"] = time.perf_counter() - t0
                metrics.update({d.key(k): v for k, v in m.items()})
            per_seed.append(metrics)
        return per_seed

    def mauve_metrics(self, continuations: list[str]) -> dict[str, float]:
        """MAUVE of one continuation per prompt (in prompt order) against the human continuations:
        ``{"mauve", "mauve_num_samples"}``.  Collective under ``accelerate``, like :meth:`generation_metrics`."""
        c, feat = self.config, self.featurizer
        p = featurize(feat, [x.human_text for x in self.prompts], self._feature_cache)  # featurized once per run
        q = featurize(feat, [x.with_continuation(t) for x, t in zip(self.prompts, continuations)])
        result = None
        if process_info()[0] == 0:
            with warnings.catch_warnings():
                # warned once at construction; not again at every evaluation
                warnings.simplefilter("ignore", UserWarning)
                result = compute_mauve(
                    p, q, scaling_factor=c.mauve_scaling_factor, kmeans_seed=c.mauve_kmeans_seed,
                    kmeans_num_redo=c.mauve_kmeans_num_redo, kmeans_max_iter=c.mauve_kmeans_max_iter,
                )
        return broadcast_from_main(result)

    def perplexity(self, model: Any, dataloader: Any) -> float:
        """exp(Σ NLL / Σ tokens) over ``dataloader``; duplicates of an uneven last batch dropped when a trainer is set."""
        gather = None
        if self.trainer is not None and getattr(self.trainer, "accelerator", None) is not None:
            gather = self.trainer.accelerator.gather_for_metrics
        nll, tokens = dataloader_nll(model, dataloader, vocab_size=self.perplexity_vocab_size, gather=gather)
        return perplexity_from_totals(nll, tokens)

    # ------------------------------------------------------------------ TrainerCallback

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None,
                    eval_dataloader=None, **kwargs):
        if metrics is None or model is None:
            return
        prefix = _metric_prefix(metrics)
        if f"{prefix}_generation_runtime" in metrics:
            return  # this evaluation was already handled (the callback was added twice)
        new: dict[str, float] = {}
        if self.compute_perplexity and f"{prefix}_perplexity" not in metrics and eval_dataloader is not None:
            new["perplexity"] = self.perplexity(model, eval_dataloader)
        if self.generation_enabled:
            if self.config.mauve:
                self._check_featurizer(model)
            new.update(self.generation_metrics(model, self.tokenizer or processing_class))
            if not self._reference_logged:
                new.update(self.reference_metrics())
                self._reference_logged = True
        if not new:
            return
        new = {f"{prefix}_{k}": v for k, v in new.items()}
        metrics.update(new)
        self._log(dict(new), args, state)

    def _log(self, logs: dict[str, float], args, state) -> None:
        if self.trainer is not None:
            self.trainer.log(logs)
            return
        if not self._warned_no_trainer:
            logger.warning(
                "GenerationEvalCallback has no trainer: its metrics go to the evaluation results and "
                "state.log_history only, not to TensorBoard/W&B. Pass trainer=... or call callback.install(trainer)."
            )
            self._warned_no_trainer = True
        entry = dict(logs)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})


def build_generation_callback(
    eval_config: EvalConfig,
    eval_texts: Sequence[str],
    tokenizer: Any,
    trainer: Any = None,
    *,
    compute_perplexity: bool = True,
    sampler: Sampler | None = None,
    perplexity_vocab_size: int | None = None,
) -> GenerationEvalCallback:
    """Build the prompts from the raw eval documents and the callback; installed in ``trainer`` if given.

    Raises a clear error when generation is on and no document is long enough for a prompt,
    or when MAUVE is on with fewer than 50 prompts; warns when fewer prompts than
    ``eval.num_prompts`` (or fewer than 500 for MAUVE) could be built.
    """
    c = eval_config
    prompts: list[Prompt] = []
    if c.generation and c.num_prompts > 0:
        prompts = build_prompts(eval_texts, c.prompt_words, c.continuation_words, c.num_prompts)
        if not prompts:
            raise ValueError(
                f"eval: no eval document has the {c.prompt_words} + {c.continuation_words} words needed for a prompt "
                "and its reference continuation; lower eval.prompt_words / eval.continuation_words, use longer "
                "documents, or set eval.generation: false"
            )
        if len(prompts) < c.num_prompts:
            warnings.warn(
                f"eval: only {len(prompts)} eval documents are long enough for a prompt "
                f"(eval.num_prompts = {c.num_prompts})",
                UserWarning,
                stacklevel=2,
            )
        if c.mauve and len(prompts) < RECOMMENDED_SAMPLES:
            logger.info("MAUVE will use %d samples per side (< %d: noisy, biased upward)", len(prompts),
                        RECOMMENDED_SAMPLES)
    callback = GenerationEvalCallback(
        prompts, c, tokenizer, compute_perplexity=compute_perplexity, sampler=sampler,
        perplexity_vocab_size=perplexity_vocab_size,
    )
    if trainer is not None:
        callback.install(trainer)
    return callback

