"""The training entry point (``scripts/train.py`` and the ``emo-train`` command).

    python scripts/train.py --config configs/emo_gpt2.yaml [--key value ...]
    accelerate launch scripts/train.py --config configs/emo_gpt2.yaml --objective mixce

Reads the YAML config, applies command-line overrides, builds tokenizer, model, data and
:class:`~emo_trainer.trainer.ObjectiveTrainer`, trains (resuming with
``--resume_from_checkpoint PATH|true``), evaluates, and saves the final model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, ExperimentConfig, build_objective, load_config
from .errors import UserError
from .runs import CONFIG_FILENAME

logger = logging.getLogger("emo_trainer")



def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a causal LM with MLE, EMO, MixCE, MiLe or SequenceMatch.",
        epilog="Any config key can be overridden: --objective emo --emo.mode 2 --learning_rate 3e-5 data.block_size=128",
    )
    p.add_argument("--config", help="YAML experiment config (see configs/)")
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None,
                   help="checkpoint dir, or 'true' for the last complete one")
    p.add_argument("--overwrite_output_dir", "--overwrite-output-dir", action="store_true",
                   help="start over in an output_dir that holds an earlier run (deletes its checkpoints and final/)")
    p.add_argument("--print_config", "--print-config", action="store_true", help="print the resolved config and exit")
    return p


#: What an earlier run leaves in its output_dir (what a new run there would mix with).
_RUN_ARTIFACTS = ("final", "final_metrics.json")


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool, cfg: ExperimentConfig | None = None) -> list[Path]:
    """Refuse to start a new run in a directory that holds another run's checkpoints or results.

    Mixing them goes wrong quietly: checkpoint rotation keeps the highest-numbered (old)
    checkpoints and deletes the new ones, ``--resume_from_checkpoint true`` then picks an old
    one, and ``final/`` is overwritten.  With ``overwrite``, returns what :func:`clear_output_dir`
    is to delete once every other check has passed (the old checkpoints, ``final/``,
    ``final_metrics.json``); refuses when the config reads a model or tokenizer from among them.
    """
    out = Path(output_dir)
    if resuming or not out.is_dir():
        return []
    old = sorted(p for p in out.iterdir() if (p.is_dir() and p.name.startswith("checkpoint-")) or p.name in _RUN_ARTIFACTS)
    if not old:
        return []
    if not overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old[:4]) + (" ..." if len(old) > 4 else "")
        raise ConfigError(
            f"training.output_dir {out} already holds a run ({names}): pass --resume_from_checkpoint true to "
            f"continue it, --overwrite_output_dir to start over there (deletes them), or another --output_dir"
        )
    if cfg is not None:
        for key, value in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
            if value and Path(value).exists() and any(Path(value).resolve().is_relative_to(p.resolve()) for p in old):
                raise ConfigError(f"--overwrite_output_dir would delete {value}, which {key} reads; "
                                  f"copy it elsewhere first, or use another --output_dir")
    return old


def clear_output_dir(old: list[Path], accelerator) -> None:
    """Delete an earlier run's ``old`` files (main process), then let every process go on."""
    import shutil

    if old and accelerator.is_main_process:
        for p in old:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        logger.warning("--overwrite_output_dir: deleted %d checkpoint(s)/result(s) of an earlier run in %s",
                       len(old), old[0].parent)
    accelerator.wait_for_everyone()


def check_report_to(report_to) -> None:
    """Every logging integration in ``training.report_to`` that transformers can test for
    (``is_<name>_available``) must be installed: checked before training, not at its first log."""
    from transformers import integrations

    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = {"azure_ml": "azureml", "comet_ml": "comet"}  # report_to name → its is_*_available
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from .config import _suggest

    missing = []
    for r in wanted:
        if r in ("none", "all"):
            continue
        if r not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"training.report_to: unknown integration '{r}'{_suggest(r, INTEGRATION_TO_CALLBACK)}; "
                              f"one of {', '.join(INTEGRATION_TO_CALLBACK)}, or none")
        available = getattr(integrations, f"is_{names.get(r, r)}_available", None)
        if available is not None and not available():
            missing.append(r)
    if missing:
        raise ConfigError(
            f"training.report_to: {', '.join(missing)} is not installed (pip install {' '.join(missing)}), "
            f"or log to the console and trainer_state.json only with --report_to none"
        )


def check_featurizer(cfg: ExperimentConfig) -> None:
    """The MAUVE featurizer must be loadable before training starts, not at the first evaluation."""
    from .modeling import _check_local, _first_line

    e = cfg.eval
    if not (e.generation and e.num_prompts and e.mauve) or e.mauve_featurizer == "hashing":
        return
    name = e.mauve_featurizer
    _check_local("eval.mauve_featurizer", name)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"eval.mauve_featurizer: cannot load '{name}' ({_first_line(err)}); give a local model directory, "
            f"'hashing', or turn MAUVE off with eval.mauve: false"
        ) from None


def build_trainer(cfg: ExperimentConfig, callbacks=None):
    """Everything needed to train ``cfg``: returns ``(trainer, eval_texts)``."""
    from .data import CausalLMCollator, calibration_set, load_raw_splits, tokenize_splits
    from .modeling import load_model, load_tokenizer
    from .trainer import ObjectiveTrainer

    args = cfg.training_arguments()
    raw = load_raw_splits(cfg.data, seed=args.seed)
    col = cfg.data.text_column
    if cfg.data.calibration_sentences:
        import datasets

        sents = calibration_set(raw["train"][col], cfg.data.calibration_sentences, seed=args.seed,
                                min_words=cfg.data.calibration_min_words)
        raw["train"] = datasets.Dataset.from_dict({col: sents})
        if args.should_save:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "calibration_set.txt").write_text("\n".join(sents) + "\n", encoding="utf-8")
    tok_dir = Path(args.output_dir) / "tokenizer" if cfg.model.train_tokenizer_vocab_size else None
    tokenizer = load_tokenizer(cfg.model, train_texts=raw["train"][col], save_dir=tok_dir)
    # Seed before the model exists (as run_clm does): a fresh model's random init is then the same
    # in every process and for every objective; the Trainer seeds again for training.
    from transformers import set_seed

    set_seed(args.seed)
    model, is_fresh = load_model(cfg.model, tokenizer)
    _check_positions(model, cfg.data.block_size)
    objective = build_objective(cfg.objective)
    prepare = getattr(objective, "prepare_model", None)
    if prepare is not None:  # e.g. SequenceMatch adds <bkspc> before the optimizer exists
        prepare(model, tokenizer)
    tokenized = tokenize_splits(raw, tokenizer, cfg.data)
    eval_texts = list(raw["validation"][col])
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        objective=objective,
        loss_path=cfg.objective.loss_path,
        chunk_size=cfg.objective.chunk_size,
        on_nonfinite=cfg.objective.on_nonfinite,
        model_is_fresh=is_fresh,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _maybe_add_generation_eval(trainer, cfg, eval_texts, tokenizer)
    return trainer, eval_texts


#: Names of learned absolute position-embedding tables (GPT-2, OPT, BERT-style models).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _check_positions(model, block_size: int) -> None:
    """Rows longer than a learned position table crash inside the embedding: refuse them.  Models
    without one (rotary, ALiBi) may be trained past ``max_position_embeddings`` (rope scaling):
    a warning only."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            if block_size > module.num_embeddings:
                raise ConfigError(
                    f"data.block_size: {block_size} tokens per row, but the model has {module.num_embeddings} "
                    f"positions ({name}); lower data.block_size to at most {module.num_embeddings}"
                )
            return
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and block_size > positions:
        logger.warning("data.block_size %d is longer than the model's max_position_embeddings %d: fine with rope "
                       "scaling, otherwise lower data.block_size", block_size, positions)


def _maybe_add_generation_eval(trainer, cfg: ExperimentConfig, eval_texts, tokenizer) -> None:
    if not cfg.eval.generation or cfg.eval.num_prompts == 0:
        return
    from .evaluation.callback import build_generation_callback

    # ObjectiveTrainer computes the token-weighted eval perplexity itself; the callback adds the
    # generation metrics, with the objective's own sampler when it has one (SequenceMatch's
    # backspace-aware sampler: metrics on the final text, deletions applied).
    build_generation_callback(
        cfg.eval, eval_texts, tokenizer, trainer=trainer, compute_perplexity=False,
        sampler=getattr(trainer.objective, "generation_sampler", None),
    )


def resolve_resume(cfg: ExperimentConfig, resume_from_checkpoint):
    """``--resume_from_checkpoint``: None, or the checkpoint directory to resume from.

    ``true``/``last`` = the last *complete* checkpoint (with its ``checkpoint_complete.json``) in
    ``training.output_dir``.  Checked before any data or model is loaded: a wrong path fails in
    a second, not after the tokenisation.
    """
    from .trainer import resolve_checkpoint

    return resolve_checkpoint(resume_from_checkpoint, cfg.training.get("output_dir") or "trainer_output")


def run(cfg: ExperimentConfig, resume_from_checkpoint=None, overwrite_output_dir: bool = False) -> dict:
    """Train and evaluate ``cfg``; returns the final metrics."""
    resume_from_checkpoint = resolve_resume(cfg, resume_from_checkpoint)
    # Cheap checks first: a user error must stop the run before data, model and training.
    stale = check_output_dir(cfg.training.get("output_dir") or "trainer_output", resume_from_checkpoint is not None,
                             overwrite_output_dir, cfg)
    check_report_to(cfg.training.get("report_to", "none"))
    check_featurizer(cfg)
    trainer, _ = build_trainer(cfg)
    clear_output_dir(stale, trainer.accelerator)  # only now that every check has passed
    args = trainer.args
    out = Path(args.output_dir)
    if args.should_save:
        cfg.save(out / CONFIG_FILENAME)
        saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        logs = "checkpoint-*/trainer_state.json" if saves else "trainer_state.json at the end"
        print(f"[emo-trainer] run directory: {out.resolve()}  (config: {CONFIG_FILENAME}, "
              f"logs: {logs}, final metrics: final_metrics.json)", flush=True)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = dict(result.metrics)
    step = trainer.state.global_step
    # The last evaluation may be logged as several entries (loss/perplexity, then generation metrics).
    final_eval = [h for h in trainer.state.log_history if h.get("step") == step and any(k.startswith("eval_") for k in h)]
    if any("eval_loss" in h for h in final_eval):
        for h in final_eval:
            metrics.update({k: v for k, v in h.items() if k.startswith("eval_")})
    elif trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if args.should_save:
        trainer.save_model(str(out / "final"))
        trainer.save_state()
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"[emo-trainer] done: final model in {out / 'final'}; metrics in {out / 'final_metrics.json'}", flush=True)
        keys = [k for k in ("eval_loss", "eval_perplexity", "eval_mauve", "eval_diversity") if k in metrics]
        print("[emo-trainer] " + ", ".join(f"{k}={metrics[k]:.4g}" for k in keys), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # faiss (MAUVE's clustering) narrates at INFO which CPU build it tried ("Could not load library
    # with AVX2 support ... ModuleNotFoundError"): not a problem, and it reads like one.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        if not known.config and not rest:
            raise ConfigError("no config given: pass --config configs/quickstart.yaml (or another file in configs/)")
        cfg = load_config(known.config, rest)
        if known.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        run(cfg, resume_from_checkpoint=known.resume_from_checkpoint, overwrite_output_dir=known.overwrite_output_dir)
    except Exception as e:
        # Error classes of the heavy modules are looked up only if those modules were imported:
        # a config error then costs the import of the config (torch), not of the Trainer stack.
        if isinstance(e, _loaded("emo_trainer.trainer", "NonFiniteLossError")):
            # not a config error: the run diverged (exit 1, checkpoints kept)
            print(f"\nerror: {_one_line(e)}", file=sys.stderr)  # newline: a progress bar may be mid-line
            return 1
        if isinstance(e, UserError):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise
    return 0


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """``(module.name,)`` if ``module`` is already imported, else ``()``."""
    m = sys.modules.get(module)
    return (getattr(m, name),) if m is not None and hasattr(m, name) else ()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
