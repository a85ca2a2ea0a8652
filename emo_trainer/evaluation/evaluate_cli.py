"""``scripts/evaluate.py``: evaluate checkpoints with the training-time protocol, write a JSON of results.

    python scripts/evaluate.py runs/emo/final runs/mle/final --eval-files wiki.test.raw \\
        --featurizer /models/gpt2-large --num-prompts 1000 --seeds 0 1 2 --output results.json
    python scripts/evaluate.py runs/quickstart/checkpoint-300 --output q.json   # data + eval from the run's config
    accelerate launch scripts/evaluate.py ...                                      # prompts sharded over GPUs

Per checkpoint: token-weighted perplexity (plain CE) over the eval documents tokenized and
packed exactly as in training (``data.block_size``, ``data.packing``, ``data.add_eos``), and, for
each sampling seed, one continuation per prompt with the same sampler, MAUVE and the
repetition/diversity metrics (``docs/evaluation.md``). With several seeds every metric is
reported as mean and ``<key>_std`` (sample std), and the per-seed values are kept. The human
baseline (metrics of the reference continuations) is written once. The featurizer is loaded once
and the reference features computed once for all checkpoints.

A SequenceMatch checkpoint (``backspace_token_id`` in its ``config.json``) is evaluated as its
training run evaluates it: perplexity over the original vocabulary (the ``<bkspc>`` column
masked, as the objective's ``eval_logits_transform``) and generation with the backspace-aware
sampler (deletions applied). ``--perplexity-vocab-size`` and ``--sampler`` override that.

Settings come from, in order: the ``eval:``/``data:`` sections of ``--config`` (default: the
``emo_trainer_config.yaml`` saved in the checkpoint's run directory, if any), then the flags
below, then ``--eval KEY=VALUE`` overrides of any ``eval:`` key (type-checked as in a config).

Bad input (a missing checkpoint or file, a wrong ``--eval`` value, an unavailable featurizer)
gives one line ``error: ...`` on stderr and exit code 2, checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from ..errors import ConfigError, DataError, UserError
from ..runs import CONFIG_FILENAME, find_run_config, run_objective
from .checkpoints import (
    backspace_id,
    check_checkpoint_dir,
    document_format,
    document_perplexity,
    load_checkpoint,
    read_documents,
)
from .config import EvalConfig

logger = logging.getLogger("emo_trainer.evaluate")
BACKSPACE_SAMPLER = "emo_trainer.objectives.sequencematch.sampler:sample_continuations_with_backspace"
PLAIN_SAMPLER = "emo_trainer.evaluation.generation:sample_continuations"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate checkpoints: perplexity, MAUVE, repetition and diversity.")
    p.add_argument("checkpoints", nargs="+", help="model directories (a run's final/ or checkpoint-N/)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--config", help=f"experiment YAML (default: {CONFIG_FILENAME} next to the first checkpoint)")
    p.add_argument("--eval-files", nargs="+", help="local eval documents (.txt/.raw: one per line; .jsonl/.json, "
                   ".parquet, .csv: --text-column); default: the config's validation split")
    p.add_argument("--text-column", default=None, help="column of --eval-files holding the text (default: text)")
    p.add_argument("--tokenizer", help="tokenizer path when a checkpoint directory has none")
    p.add_argument("--seeds", nargs="+", type=int, help="sampling seeds (mean ± std over them)")
    p.add_argument("--num-prompts", type=int, help="eval.num_prompts (0: no generation)")
    p.add_argument("--featurizer", help="eval.mauve_featurizer: hub id, local path, or 'hashing'")
    p.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens")
    p.add_argument("--batch-size", type=int, help="eval.batch_size (generation) and perplexity batch size")
    p.add_argument("--block-size", type=int, help="data.block_size for perplexity")
    p.add_argument("--decodings", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="decoding settings besides the main one, each logged under its name (eval.decodings), "
                        "e.g. --decodings top_p=0.95 adds top_p0.95_mauve, top_p0.95_rep_2, ...")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE", help="any eval: key, repeatable")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    p.add_argument("--no-generation", action="store_true", help="skip sampling (perplexity only)")
    p.add_argument("--sampler", help="module:function, the sampler of every checkpoint (default: the backspace-aware "
                   f"{BACKSPACE_SAMPLER} for a SequenceMatch checkpoint, {PLAIN_SAMPLER} otherwise)")
    p.add_argument("--perplexity-vocab-size", type=int, help="softmax over the first N logits only, for every "
                   "checkpoint (default: a SequenceMatch checkpoint's <bkspc> column masked, as in training)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    return p


# --------------------------------------------------------------------------- checks (before anything expensive)


def _usage_error(message: str) -> ConfigError:
    return ConfigError(message)


def _check_eval_files(files: list[str]) -> str:
    """The ``datasets`` builder of ``files`` (all must exist and share one format)."""
    try:
        return document_format(files, "--eval-files")
    except DataError as e:
        raise _usage_error(str(e)) from None


def _find_config(args) -> Path | None:
    return Path(args.config) if args.config else find_run_config(args.checkpoints[0])


def _eval_config(base: EvalConfig, args) -> EvalConfig:
    """``base`` with the flags and ``--eval KEY=VALUE`` applied, each type-checked and range-checked as the
    ``eval:`` section of a training config (same messages: ``eval.KEY: expected ...``)."""
    from ..config import build_section, cli_value, validate_eval

    raw = {}
    for flag, key in (("seeds", "seeds"), ("num_prompts", "num_prompts"), ("featurizer", "mauve_featurizer"),
                      ("max_new_tokens", "max_new_tokens"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    for item in args.eval:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("eval.")
        if not sep or not key:
            raise _usage_error(f"--eval {item}: expected KEY=VALUE with KEY an eval: key, e.g. --eval num_prompts=200")
        raw[key] = cli_value(["eval", key], value)
    if args.decodings:
        from .config import parse_decoding

        raw["decodings"] = [parse_decoding(d) for d in args.decodings]
    if args.no_generation:
        raw["generation"] = False
    built = build_section(EvalConfig, raw, "eval")  # unknown keys and wrong types: ConfigError naming the key
    cfg = dataclasses.replace(base, **{k: getattr(built, k) for k in raw})
    validate_eval(cfg)
    if cfg.num_prompts == 0:  # as in training: no prompts, no generation metrics
        cfg = dataclasses.replace(cfg, generation=False)
    return cfg


def _sampler(spec: str | None):
    if not spec:
        return None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise _usage_error(f"--sampler {spec}: expected module:function, e.g. {BACKSPACE_SAMPLER}")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise _usage_error(f"--sampler {spec}: cannot import {module} ({e})") from None
    if not callable(fn):
        raise _usage_error(f"--sampler {spec}: {module} has no function {name}")
    return fn


def _check_featurizer(cfg: EvalConfig) -> None:
    """Fail before any model is loaded when the MAUVE featurizer cannot be found (e.g. a hub id offline)."""
    if not (cfg.generation and cfg.mauve) or cfg.mauve_featurizer == "hashing":
        return
    spec = cfg.mauve_featurizer
    fix = ("pass --featurizer with a local model directory, or --featurizer hashing (offline n-gram featurizer), "
           "or --eval mauve=false")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _usage_error(f"MAUVE featurizer '{spec}': not a model directory (no config.json); {fix}")
        return
    from transformers import AutoConfig

    try:
        try:
            AutoConfig.from_pretrained(spec, local_files_only=True)  # the hub cache: no network retries
        except (OSError, ValueError):
            AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise _usage_error(f"MAUVE featurizer '{spec}' (eval.mauve_featurizer): not a local directory and not "
                           f"loadable from the Hugging Face Hub ({reason}); {fix}") from None


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load ... AVX2": harmless
    from ..cli import _one_line

    try:
        rc = evaluate_checkpoints(args)
    except UserError as e:  # the training CLI's convention: one line, exit 2
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    from .sharding import release_process_group

    release_process_group()  # under torchrun/accelerate: a clean exit instead of an occasional SIGABRT
    return rc


def evaluate_checkpoints(args: argparse.Namespace) -> int:
    """Evaluate ``args.checkpoints`` as :func:`make_parser` describes; write ``args.output``."""
    from ..config import DataConfig, load_config

    # Everything the user typed is checked first: a typo fails in seconds, not after loading models.
    for c in args.checkpoints:
        check_checkpoint_dir(c)
    if args.eval_files:
        _check_eval_files(args.eval_files)
    if Path(args.output).is_dir():
        raise _usage_error(f"--output {args.output}: is a directory; give a file name, e.g. "
                           f"{Path(args.output) / 'results.json'}")
    config_path = _find_config(args)
    if config_path is not None:
        exp = load_config(config_path)  # ConfigError for a missing/invalid file
        base_eval, data_cfg = exp.eval, exp.data
        logger.info("settings from %s", config_path)
    else:
        base_eval, data_cfg = EvalConfig(), DataConfig()
    if not args.eval_files and config_path is None:
        raise _usage_error("no eval data: pass --eval-files, or --config (or a checkpoint inside a run directory, "
                           f"next to its {CONFIG_FILENAME})")
    if args.text_column:
        data_cfg = dataclasses.replace(data_cfg, text_column=args.text_column)
    if args.block_size is not None:
        if args.block_size < 2:
            raise _usage_error(f"--block-size: must be at least 2 tokens, got {args.block_size}")
        data_cfg = dataclasses.replace(data_cfg, block_size=args.block_size)
    if args.perplexity_vocab_size is not None and args.perplexity_vocab_size < 1:
        raise _usage_error(f"--perplexity-vocab-size: must be at least 1, got {args.perplexity_vocab_size}")
    cfg = _eval_config(base_eval, args)
    sampler_override = _sampler(args.sampler)
    _check_featurizer(cfg)

    from accelerate import PartialState

    from .callback import GenerationEvalCallback, aggregate_seeds
    from .prompts import build_prompts

    state = PartialState()  # initialises torch.distributed under `accelerate launch`
    if args.eval_files:
        try:
            documents = read_documents(args.eval_files, data_cfg.text_column, label="--eval-files",
                                       column_label="--text-column")
        except DataError as e:
            raise _usage_error(str(e)) from None
        source = list(args.eval_files)
    else:
        from ..data import load_raw_splits

        seed = exp.training.get("seed", 42)
        documents = list(load_raw_splits(data_cfg, seed=seed)["validation"][data_cfg.text_column])
        source = f"validation split of {config_path}"
    if not documents:
        raise _usage_error(f"no eval documents: {source} holds no non-empty text")

    prompts = build_prompts(documents, cfg.prompt_words, cfg.continuation_words, cfg.num_prompts) \
        if cfg.generation else []
    if cfg.generation and not prompts:
        raise _usage_error(f"no eval document has {cfg.prompt_words} + {cfg.continuation_words} words; "
                           "lower eval.prompt_words / eval.continuation_words")
    evaluator = GenerationEvalCallback(prompts, cfg, compute_perplexity=False)
    fingerprint = hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()[:16]
    results = {
        "protocol": {**dataclasses.asdict(cfg), "eval_source": source, "num_documents": len(documents),
                     "eval_data_sha256": fingerprint, "num_prompts_built": len(prompts),
                     "data": dataclasses.asdict(data_cfg)},
        "reference": evaluator.reference_metrics() if prompts else {},
        "checkpoints": {},
    }
    for path in args.checkpoints:
        model, tokenizer = load_checkpoint(path, args.tokenizer, args.dtype)
        backspace = backspace_id(model)
        objective = run_objective(path) or ("sequencematch" if backspace is not None else None)
        sampler = sampler_override or (_sampler(BACKSPACE_SAMPLER) if backspace is not None else None)
        sampler_name = args.sampler or (BACKSPACE_SAMPLER if backspace is not None else PLAIN_SAMPLER)
        if args.perplexity_vocab_size is not None:
            vocab = f"first {args.perplexity_vocab_size} logits (--perplexity-vocab-size)"
        elif backspace is not None:
            vocab = f"original vocabulary (<bkspc> = {backspace} masked)"
        else:
            vocab = "full"
        if backspace is not None:
            logger.info("%s: SequenceMatch checkpoint (model.config.backspace_token_id = %d): perplexity over %s, "
                        "sampler %s", path, backspace, vocab, sampler_name)
        out: dict = {"objective": objective}
        if backspace is not None:
            out["backspace_token_id"] = backspace
        t0 = time.perf_counter()
        if not args.no_perplexity:
            out.update(document_perplexity(model, tokenizer, documents, data_config=data_cfg,
                                           batch_size=cfg.batch_size, vocab_size=args.perplexity_vocab_size,
                                           backspace=backspace))
            out["perplexity_vocab"] = vocab
        out["perplexity_runtime"] = round(time.perf_counter() - t0, 3)
        if evaluator.generation_enabled:
            t0 = time.perf_counter()
            evaluator.sampler = sampler
            try:
                per_seed = evaluator.per_seed_metrics(model, tokenizer)
            except OSError as e:
                if "MAUVE featurizer" not in str(e):
                    raise
                raise _usage_error(str(e)) from None
            for m in per_seed:
                m.pop("mauve_runtime", None)
            out.update(aggregate_seeds(per_seed))
            out["sampler"] = sampler_name
            out["seeds"] = list(cfg.seeds)
            out["per_seed"] = per_seed
            out["generation_runtime"] = round(time.perf_counter() - t0, 3)
        results["checkpoints"][path] = out
        if state.is_main_process:
            keys = [k for k in ("perplexity", "mauve", "mauve_std", "diversity", "rep_4") if k in out]
            print(f"[evaluate] {path}: " + ", ".join(f"{k}={out[k]:.4g}" for k in keys), flush=True)
        del model
    if state.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(f"[evaluate] wrote {args.output}", flush=True)
    return 0

