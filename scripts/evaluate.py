#!/usr/bin/env python
"""Evaluate one or more checkpoints with the training-time protocol and write a JSON of results.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import yaml

from emo_trainer.eval_config import EvalConfig

logger = logging.getLogger("emo_trainer.evaluate")
CONFIG_FILENAME = "emo_trainer_config.yaml"
_FORMATS = {".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv"}
BACKSPACE_SAMPLER = "emo_trainer.backspace_generation:sample_continuations_with_backspace"
PLAIN_SAMPLER = "emo_trainer.generation:sample_continuations"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


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


def _usage_error(message: str):
    from emo_trainer.config import ConfigError

    return ConfigError(message)


def _check_checkpoints(paths: list[str]) -> None:
    for c in paths:
        p = Path(c)
        if not p.exists():
            raise _usage_error(f"checkpoint {c}: no such directory; pass a run's final/ or checkpoint-N/ folder")
        if not p.is_dir():
            raise _usage_error(f"checkpoint {c}: not a directory; pass a run's final/ or checkpoint-N/ folder")
        if not (p / "config.json").is_file():
            if (p / "adapter_config.json").is_file():
                raise _usage_error(f"checkpoint {c}: a LoRA adapter, not a full model; merge it first: "
                                   f"python scripts/merge_lora.py {c} MERGED_DIR")
            hint = f" (did you mean {p / 'final'}?)" if (p / "final" / "config.json").is_file() else ""
            raise _usage_error(f"checkpoint {c}: no config.json, not a model directory{hint}; "
                               "pass a run's final/ or checkpoint-N/ folder")


def _check_eval_files(files: list[str]) -> str:
    """The ``datasets`` builder of ``files`` (all must exist and share one format)."""
    for f in files:
        if not Path(f).is_file():
            what = "is a directory" if Path(f).is_dir() else "file not found"
            raise _usage_error(f"--eval-files: {what}: {f}")
    suffixes = {Path(f).suffix.lower() for f in files}
    fmts = {_FORMATS.get(s) for s in suffixes}
    if len(fmts) != 1 or None in fmts:
        raise _usage_error(f"--eval-files: use files of one format among {', '.join(sorted(_FORMATS))}; "
                           f"got {', '.join(sorted(s or '(no suffix)' for s in suffixes))}")
    return fmts.pop()


def _find_config(args) -> Path | None:
    if args.config:
        return Path(args.config)
    first = Path(args.checkpoints[0])
    for d in (first, first.parent, first.parent.parent):
        if (d / CONFIG_FILENAME).is_file():
            return d / CONFIG_FILENAME
    return None


def _eval_config(base: EvalConfig, args) -> EvalConfig:
    """``base`` with the flags and ``--eval KEY=VALUE`` applied, each type-checked and range-checked as the
    ``eval:`` section of a training config (same messages: ``eval.KEY: expected ...``)."""
    from emo_trainer.config import build_section, cli_value, validate_eval

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


# --------------------------------------------------------------------------- data and models


def _read_files(files: list[str], fmt: str, column: str) -> list[str]:
    import datasets

    kwargs = {"keep_linebreaks": False} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files={"eval": list(files)}, **kwargs)["eval"]
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        reason = " ".join(str(e).split())[:200]
        raise _usage_error(f"--eval-files: could not read {', '.join(files)} as {fmt} ({type(e).__name__}: "
                           f"{reason})") from None
    if column not in ds.column_names:
        raise _usage_error(f"--text-column: no column '{column}' in --eval-files "
                           f"(columns: {', '.join(ds.column_names)}); pass --text-column NAME")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def _run_objective(path: str) -> str | None:
    """``objective.name`` of the run the checkpoint belongs to (its saved config), or None."""
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        f = d / CONFIG_FILENAME
        if f.is_file():
            try:
                raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                return None
            obj = raw.get("objective", {}) if isinstance(raw, dict) else None
            name = obj.get("name", "mle") if isinstance(obj, dict) else obj  # the config's default: mle
            return str(name) if name else None
    return None


def _load_model(path: str, tokenizer_path: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    candidates = [tokenizer_path] if tokenizer_path else [path, str(Path(path) / "tokenizer"),
                                                           str(Path(path).parent / "tokenizer")]
    tok = None
    for c in candidates:
        if Path(c).is_dir() and not any((Path(c) / f).is_file() for f in _TOKENIZER_FILES):
            continue  # transformers would build an empty tokenizer from config.json alone
        try:
            tok = AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError, TypeError):
            continue
        if len(tok) > 1:
            break
        tok = None
    if tok is None:
        raise _usage_error(f"checkpoint {path}: no tokenizer found (tried {', '.join(candidates)}); pass --tokenizer")
    from emo_trainer.modeling import _load_error, load_error_reason

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as e:  # a truncated safetensors file, a pickle weights_only refuses: one line too
        if not _load_error(e):
            raise
        raise _usage_error(f"checkpoint {path}: cannot load a causal LM ({load_error_reason(e)})") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise _usage_error(f"checkpoint {path}: tokenizer has {len(tok)} tokens but the model's embedding only "
                           f"{model.get_input_embeddings().weight.shape[0]}; pass the run's tokenizer with --tokenizer")
    from accelerate import PartialState

    device = PartialState().device
    return model.to(device).eval(), tok


def _without_backspace(model, backspace_id: int):
    """``model`` whose logits have the ``<bkspc>`` column at −inf: the SequenceMatch objective's
    ``eval_logits_transform`` (:func:`emo_trainer.backspace.strip_backspace_logits`), so perplexity is
    over the original vocabulary exactly as ``ObjectiveTrainer`` reports it during training."""
    import torch

    from emo_trainer.backspace import strip_backspace_logits

    class WithoutBackspace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            out = self.model(**inputs)
            out.logits = strip_backspace_logits(out.logits, backspace_id)
            return out

    return WithoutBackspace()


# --------------------------------------------------------------------------- perplexity


def _perplexity(model, tokenizer, documents, data_cfg, batch_size: int, vocab_size: int | None,
                backspace_id: int | None = None) -> dict:
    import datasets
    import torch

    from emo_trainer.data import CausalLMCollator, tokenize_splits
    from emo_trainer.metrics.perplexity import dataloader_nll, perplexity_from_totals
    from emo_trainer.sharding import gather_in_order, process_info

    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and data_cfg.block_size > max_pos:
        data_cfg = dataclasses.replace(data_cfg, block_size=max_pos)
    raw = datasets.DatasetDict({"eval": datasets.Dataset.from_dict({data_cfg.text_column: documents})})
    blocks = tokenize_splits(raw, tokenizer, data_cfg)["eval"]
    rank, world = process_info()
    mine = blocks.select(range(rank, len(blocks), world))  # disjoint shards: every block counted once
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, collate_fn=CausalLMCollator(pad))
    scored = model if backspace_id is None or vocab_size is not None else _without_backspace(model, backspace_id)
    nll, tokens = dataloader_nll(scored, loader, vocab_size=vocab_size)
    totals = gather_in_order([(nll, tokens)], world)
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    return {"perplexity": perplexity_from_totals(nll, tokens), "nll": nll / tokens, "num_tokens": tokens,
            "block_size": data_cfg.block_size, "num_blocks": len(blocks)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load ... AVX2": harmless
    from emo_trainer.cli import _one_line
    from emo_trainer.config import ConfigError
    from emo_trainer.data import DataError
    from emo_trainer.metrics.mauve import MauveSampleError

    try:
        return _evaluate(args)
    except (ConfigError, DataError, MauveSampleError) as e:  # the training CLI's convention: one line, exit 2
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _evaluate(args) -> int:
    from emo_trainer.config import DataConfig, load_config

    # Everything the user typed is checked first: a typo fails in seconds, not after loading models.
    _check_checkpoints(args.checkpoints)
    fmt = _check_eval_files(args.eval_files) if args.eval_files else None
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

    from emo_trainer.backspace import backspace_token_id
    from emo_trainer.evaluation import GenerationEvalCallback, aggregate_seeds
    from emo_trainer.prompts import build_prompts

    state = PartialState()  # initialises torch.distributed under `accelerate launch`
    if args.eval_files:
        documents, source = _read_files(args.eval_files, fmt, data_cfg.text_column), list(args.eval_files)
    else:
        from emo_trainer.data import load_raw_splits

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
        model, tokenizer = _load_model(path, args.tokenizer, args.dtype)
        backspace = backspace_token_id(model=model)
        objective = _run_objective(path) or ("sequencematch" if backspace is not None else None)
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
            out.update(_perplexity(model, tokenizer, documents, data_cfg, cfg.batch_size, args.perplexity_vocab_size,
                                   backspace))
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


if __name__ == "__main__":
    sys.exit(main())
