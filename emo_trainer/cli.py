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
import os
import signal
import sys
import threading
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
    p.add_argument("--allow_objective_change", "--allow-objective-change", action="store_true",
                   help="resume a checkpoint written with another objective (weights, optimizer and step carry over)")
    p.add_argument("--print_config", "--print-config", action="store_true", help="print the resolved config and exit")
    return p


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a complete checkpoint was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum, self.exit_code = step, signum, 128 + signum
        super().__init__(f"interrupted at step {step}; resume with --resume_from_checkpoint true")


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


def check_writable(output_dir: str | Path) -> None:
    """``training.output_dir`` must be a directory (or creatable) that this process can write in:
    checked before training, not at the first checkpoint.  Creates nothing; writes and deletes one
    probe file in the nearest existing directory."""
    import tempfile

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"training.output_dir: {out} is a file, not a directory; give another --output_dir")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"training.output_dir: cannot create {out}: {probe} is a file; give another --output_dir")
    try:
        fd, name = tempfile.mkstemp(prefix=".emo_trainer_write_test_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"training.output_dir: cannot write in {probe} ({e.strerror or e}); give a writable "
                          f"--output_dir") from None


#: model.config keys that fix tensor shapes (compared with the checkpoint's config.json before any data is read)
_SIZE_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "intermediate_size", "max_position_embeddings", "head_dim",
              "vocab_size")


def check_resume_config(cfg: ExperimentConfig, checkpoint: str, allow_objective_change: bool = False) -> None:
    """What can be checked before any data or model is loaded: the objective (from the checkpoint's
    completion marker), the sizes in ``model.config`` (against the checkpoint's ``config.json``) and
    the trained tokenizer's vocabulary size (against the run's saved config)."""
    import yaml

    from .trainer import checkpoint_objective, objective_change_message

    ckpt = Path(checkpoint)
    old = checkpoint_objective(ckpt)
    if old is not None and old != cfg.objective.name and not allow_objective_change:
        raise ConfigError(objective_change_message(ckpt, old, cfg.objective.name))
    hint = (f"resume with the run's settings ({ckpt.parent / CONFIG_FILENAME}) or start a new run in another "
            f"--output_dir")
    saved_model = ckpt / "config.json"
    if cfg.model.config and saved_model.is_file():
        try:
            saved = json.loads(saved_model.read_text())
        except ValueError:
            saved = {}
        for k in _SIZE_KEYS:
            if k in cfg.model.config and k in saved and json.loads(json.dumps(cfg.model.config[k])) != saved[k]:
                raise ConfigError(f"--resume_from_checkpoint: model.config.{k} is {cfg.model.config[k]!r} but {ckpt} was "
                                  f"trained with {saved[k]!r}; {hint}")
    saved_run = ckpt.parent / CONFIG_FILENAME
    if cfg.model.train_tokenizer_vocab_size and saved_run.is_file():
        try:
            before = (yaml.safe_load(saved_run.read_text()) or {}).get("model", {}).get("train_tokenizer_vocab_size")
        except (yaml.YAMLError, AttributeError, OSError):
            before = None
        if before is not None and before != cfg.model.train_tokenizer_vocab_size:
            raise ConfigError(f"--resume_from_checkpoint: model.train_tokenizer_vocab_size is "
                              f"{cfg.model.train_tokenizer_vocab_size} but the run in {ckpt.parent} trained its tokenizer "
                              f"with {before}; {hint}")


def check_resume_model(trainer, checkpoint: str) -> None:
    """The model and tokenizer built for this run must be the checkpoint's: same parameter names and
    shapes (read from the safetensors headers, no weights loaded) and the same vocabulary.  Checked
    before anything in the run directory is written."""
    ckpt = Path(checkpoint)
    hint = (f"resume with the run's settings ({ckpt.parent / CONFIG_FILENAME}) or start a new run in another "
            f"--output_dir")
    args = trainer.args
    if not (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):  # sharded formats: not checked here
        _check_resume_weights(trainer.model, ckpt, hint)
    tok = trainer.processing_class
    if tok is not None and hasattr(tok, "get_vocab") and any((ckpt / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        try:
            saved = AutoTokenizer.from_pretrained(str(ckpt))
        except (OSError, ValueError):
            return
        a, b = tok.get_vocab(), saved.get_vocab()
        if a != b:
            diff = sum(1 for t, i in a.items() if b.get(t) != i) + sum(1 for t in b if t not in a)
            raise ConfigError(f"--resume_from_checkpoint: the tokenizer has {len(a)} tokens, {ckpt} was trained with "
                              f"{len(b)} ({diff} token(s) differ); {hint}")


def _check_resume_weights(model, ckpt: Path, hint: str) -> None:
    from safetensors import safe_open

    peft = hasattr(model, "peft_config")
    files = sorted(ckpt.glob("adapter_model.safetensors" if peft else "model*.safetensors"))
    if not files:
        return
    saved: dict[str, list[int]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                saved[k] = list(fh.get_slice(k).get_shape())
    if peft:
        from peft import get_peft_model_state_dict

        mine = {k: list(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        covered = set(mine)
    else:
        state = model.state_dict()
        mine = {k: list(v.shape) for k, v in state.items()}
        # tied weights (lm_head = wte) are saved once: a key is covered when any key sharing its storage is saved
        by_ptr: dict[int, set[str]] = {}
        for k, v in state.items():
            by_ptr.setdefault(v.data_ptr(), set()).add(k)
        covered = {k for k, v in state.items() if by_ptr[v.data_ptr()] & saved.keys()}
    for k, shape in saved.items():
        if k in mine and mine[k] != shape:
            raise ConfigError(f"--resume_from_checkpoint: {ckpt} holds {k} of shape {shape}, this config builds "
                              f"{mine[k]} (the model size, model.lora or the vocabulary changed); {hint}")
    extra = sorted(saved.keys() - mine.keys())
    missing = sorted(set(mine) - covered)
    if extra or missing:
        what = f"{len(extra)} tensor(s) this model lacks (e.g. {extra[0]})" if extra else \
            f"no {missing[0]} ({len(missing)} tensor(s) of this model missing)"
        raise ConfigError(f"--resume_from_checkpoint: {ckpt} holds {what}: the model changed; {hint}")


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


def build_trainer(cfg: ExperimentConfig, callbacks=None, resuming: bool = False):
    """Everything needed to train ``cfg``: returns ``(trainer, eval_texts)``.

    ``resuming``: write nothing in the run directory (the run's ``tokenizer/`` stays as it is; the
    calibration set is kept in ``trainer.calibration_sentences`` for :func:`write_run_files` to
    write once the resume has been checked)."""
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
        if args.should_save and not resuming:
            _write_calibration_set(args.output_dir, sents)
    else:
        sents = None
    tok_dir = Path(args.output_dir) / "tokenizer" if cfg.model.train_tokenizer_vocab_size and not resuming else None
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
    trainer.calibration_sentences = sents
    _maybe_add_generation_eval(trainer, cfg, eval_texts, tokenizer)
    return trainer, eval_texts


def _write_calibration_set(output_dir, sents: list[str]) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration_set.txt").write_text("\n".join(sents) + "\n", encoding="utf-8")


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


def run(cfg: ExperimentConfig, resume_from_checkpoint=None, overwrite_output_dir: bool = False,
        allow_objective_change: bool = False) -> dict:
    """Train and evaluate ``cfg``; returns the final metrics.

    A resume is checked against the checkpoint (objective, model sizes and names, vocabulary)
    before anything in the run directory is written.  SIGINT/SIGTERM during training finish the
    current optimizer step, save a complete checkpoint and raise :class:`TrainingInterrupted`.
    """
    from .trainer import CheckpointSaveError, save_failure_message

    resume_from_checkpoint = resolve_resume(cfg, resume_from_checkpoint)
    resuming = resume_from_checkpoint is not None
    # Cheap checks first: a user error must stop the run before data, model and training.
    output_dir = cfg.training.get("output_dir") or "trainer_output"
    stale = check_output_dir(output_dir, resuming, overwrite_output_dir, cfg)
    check_writable(output_dir)
    if resuming:
        check_resume_config(cfg, resume_from_checkpoint, allow_objective_change)
    check_report_to(cfg.training.get("report_to", "none"))
    check_featurizer(cfg)
    interrupt = _interrupt_handler()
    trainer, _ = build_trainer(cfg, callbacks=[interrupt], resuming=resuming)
    if resuming:
        check_resume_model(trainer, resume_from_checkpoint)
    clear_output_dir(stale, trainer.accelerator)  # only now that every check has passed
    args = trainer.args
    out = Path(args.output_dir)
    if args.should_save:
        try:
            if resuming and trainer.calibration_sentences is not None:
                _write_calibration_set(out, trainer.calibration_sentences)
            cfg.save(out / CONFIG_FILENAME)
        except OSError as e:
            raise CheckpointSaveError(save_failure_message(out / CONFIG_FILENAME, e)) from e
        saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        logs = "checkpoint-*/trainer_state.json" if saves else "trainer_state.json at the end"
        print(f"[emo-trainer] run directory: {out.resolve()}  (config: {CONFIG_FILENAME}, "
              f"logs: {logs}, final metrics: final_metrics.json)", flush=True)
    with interrupt.installed():
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint,
                               allow_objective_change=allow_objective_change)
        if interrupt.signum is not None:
            step = trainer.state.global_step
            if not (out / f"checkpoint-{step}" / _complete_marker()).exists():  # stopped outside a step's end
                trainer._save_checkpoint(trainer.model, trial=None)
            raise TrainingInterrupted(step, interrupt.signum)
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
        try:
            trainer.save_model(str(out / "final"))
            trainer.save_state()
            (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        except OSError as e:
            raise CheckpointSaveError(save_failure_message(out / "final", e)) from e
        print(f"[emo-trainer] done: final model in {out / 'final'}; metrics in {out / 'final_metrics.json'}", flush=True)
        keys = [k for k in ("eval_loss", "eval_perplexity", "eval_mauve", "eval_diversity") if k in metrics]
        print("[emo-trainer] " + ", ".join(f"{k}={metrics[k]:.4g}" for k in keys), flush=True)
    return metrics


def _complete_marker() -> str:
    from .trainer import COMPLETE_MARKER

    return COMPLETE_MARKER


def _interrupt_handler():
    """A new :class:`_Interrupt` that is also a ``TrainerCallback`` (transformers imported only here)."""
    from transformers import TrainerCallback

    return type("InterruptCallback", (_Interrupt, TrainerCallback), {})()


class _Interrupt:
    """SIGINT/SIGTERM while training: the first one lets the current optimizer step finish, then the
    Trainer logs, saves a complete checkpoint and stops; a second one exits at once (no save).

    With several processes the flag is combined over processes at every step end (one tiny
    all-reduce), so every process saves and stops at the same step.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n[emo-trainer] {name} again: aborting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n[emo-trainer] {name}: finishing this step and saving a checkpoint (send it again to abort at once)",
              file=sys.stderr, flush=True)

    class _Installed:
        def __init__(self, handler):
            self.handler = handler

        def __enter__(self):
            h = self.handler
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    h._previous[sig] = signal.signal(sig, h._handle)

        def __exit__(self, *exc):
            h = self.handler
            for sig, old in h._previous.items():
                signal.signal(sig, old)
            h._previous.clear()

    def installed(self):
        return self._Installed(self)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signum is not None
        if args.world_size > 1:
            import torch

            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                t = torch.tensor([self.signum or 0], device=args.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if int(t[0]) and self.signum is None:
                    self.signum = int(t[0])  # another process was signalled
                stop = self.signum is not None
        if stop:
            control.should_log = True  # the logging window so far goes into the checkpoint's trainer_state.json
            control.should_save = True
            control.should_training_stop = True
        return control


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
        run(cfg, resume_from_checkpoint=known.resume_from_checkpoint, overwrite_output_dir=known.overwrite_output_dir,
            allow_objective_change=known.allow_objective_change)
        from .evaluation.sharding import release_process_group

        release_process_group()  # under torchrun/accelerate: a clean exit instead of an occasional SIGABRT
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading data, final evaluation)
        print("\ninterrupted outside the training loop: nothing more was saved; run the command again "
              "(with --resume_from_checkpoint true if the run has a checkpoint)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as e:
        # Error classes of the heavy modules are looked up only if those modules were imported:
        # a config error then costs the import of the config (torch), not of the Trainer stack.
        if isinstance(e, _loaded("emo_trainer.trainer", "NonFiniteLossError") + _loaded("emo_trainer.trainer",
                                                                                      "CheckpointSaveError")):
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
