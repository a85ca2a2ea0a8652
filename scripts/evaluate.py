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

Settings come from, in order: the ``eval:``/``data:`` sections of ``--config`` (default: the
``emo_trainer_config.yaml`` saved in the checkpoint's run directory, if any), then the flags
below, then ``--eval KEY=VALUE`` overrides of any ``eval:`` key.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--num-prompts", type=int, help="eval.num_prompts")
    p.add_argument("--featurizer", help="eval.mauve_featurizer: hub id, local path, or 'hashing'")
    p.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens")
    p.add_argument("--batch-size", type=int, help="eval.batch_size (generation) and perplexity batch size")
    p.add_argument("--block-size", type=int, help="data.block_size for perplexity")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE", help="any eval: key, repeatable")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    p.add_argument("--no-generation", action="store_true", help="skip sampling (perplexity only)")
    p.add_argument("--sampler", help="module:function replacing the default sampler (e.g. a backspace-aware one)")
    p.add_argument("--perplexity-vocab-size", type=int, help="softmax over the first N logits only (SequenceMatch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    return p


# --------------------------------------------------------------------------- settings


def _find_config(args) -> Path | None:
    if args.config:
        return Path(args.config)
    first = Path(args.checkpoints[0])
    for d in (first, first.parent, first.parent.parent):
        if (d / CONFIG_FILENAME).is_file():
            return d / CONFIG_FILENAME
    return None


def _eval_config(base: EvalConfig, args) -> EvalConfig:
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    updates = {}
    for flag, key in (("seeds", "seeds"), ("num_prompts", "num_prompts"), ("featurizer", "mauve_featurizer"),
                      ("max_new_tokens", "max_new_tokens"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            updates[key] = getattr(args, flag)
    for item in args.eval:
        key, sep, value = item.partition("=")
        key = key.removeprefix("eval.")
        if not sep or key not in fields:
            raise SystemExit(f"--eval {item}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        updates[key] = yaml.safe_load(value)
    if "seeds" in updates:
        updates["seeds"] = tuple(updates["seeds"]) if isinstance(updates["seeds"], (list, tuple)) else (updates["seeds"],)
    if args.no_generation:
        updates["generation"] = False
    return dataclasses.replace(base, **updates)


def _read_files(files: list[str], column: str) -> list[str]:
    import datasets

    suffixes = {Path(f).suffix.lower() for f in files}
    fmts = {_FORMATS.get(s) for s in suffixes}
    if len(fmts) != 1 or None in fmts:
        raise SystemExit(f"--eval-files: use files of one format among {', '.join(sorted(_FORMATS))}; got {suffixes}")
    fmt = fmts.pop()
    kwargs = {"keep_linebreaks": False} if fmt == "text" else {}
    ds = datasets.load_dataset(fmt, data_files={"eval": list(files)}, **kwargs)["eval"]
    if column not in ds.column_names:
        raise SystemExit(f"--text-column: no column '{column}' in --eval-files (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def _load_model(path: str, tokenizer_path: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    candidates = [tokenizer_path] if tokenizer_path else [path, str(Path(path) / "tokenizer"),
                                                           str(Path(path).parent / "tokenizer")]
    tok = None
    for c in candidates:
        try:
            tok = AutoTokenizer.from_pretrained(c)
            break
        except (OSError, ValueError, TypeError):
            continue
    if tok is None:
        raise SystemExit(f"{path}: no tokenizer found (tried {', '.join(candidates)}); pass --tokenizer")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise SystemExit(f"{path}: tokenizer has {len(tok)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().weight.shape[0]}")
    from accelerate import PartialState

    device = PartialState().device
    return model.to(device).eval(), tok


def _sampler(spec: str | None):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- perplexity


def _perplexity(model, tokenizer, documents, data_cfg, batch_size: int, vocab_size: int | None) -> dict:
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
    nll, tokens = dataloader_nll(model, loader, vocab_size=vocab_size)
    totals = gather_in_order([(nll, tokens)], world)
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    return {"perplexity": perplexity_from_totals(nll, tokens), "nll": nll / tokens, "num_tokens": tokens,
            "block_size": data_cfg.block_size, "num_blocks": len(blocks)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load ... AVX2": harmless
    from accelerate import PartialState

    from emo_trainer.config import DataConfig, load_config
    from emo_trainer.evaluation import GenerationEvalCallback, aggregate_seeds
    from emo_trainer.prompts import build_prompts

    state = PartialState()  # initialises torch.distributed under `accelerate launch`
    config_path = _find_config(args)
    if config_path is not None:
        exp = load_config(config_path)
        base_eval, data_cfg = exp.eval, exp.data
        logger.info("settings from %s", config_path)
    else:
        base_eval, data_cfg = EvalConfig(), DataConfig()
    if args.text_column:
        data_cfg = dataclasses.replace(data_cfg, text_column=args.text_column)
    if args.block_size:
        data_cfg = dataclasses.replace(data_cfg, block_size=args.block_size)
    cfg = _eval_config(base_eval, args)

    if args.eval_files:
        documents, source = _read_files(args.eval_files, data_cfg.text_column), list(args.eval_files)
    elif config_path is not None:
        from emo_trainer.data import load_raw_splits

        seed = exp.training.get("seed", 42)
        documents = list(load_raw_splits(data_cfg, seed=seed)["validation"][data_cfg.text_column])
        source = f"validation split of {config_path}"
    else:
        raise SystemExit("no eval data: pass --eval-files, or --config (or a checkpoint inside a run directory)")

    prompts = build_prompts(documents, cfg.prompt_words, cfg.continuation_words, cfg.num_prompts) \
        if cfg.generation else []
    if cfg.generation and not prompts:
        raise SystemExit(f"no eval document has {cfg.prompt_words} + {cfg.continuation_words} words; "
                         "lower eval.prompt_words / eval.continuation_words")
    evaluator = GenerationEvalCallback(prompts, cfg, compute_perplexity=False, sampler=_sampler(args.sampler),
                                       perplexity_vocab_size=args.perplexity_vocab_size)
    results = {
        "protocol": {**dataclasses.asdict(cfg), "eval_source": source, "num_documents": len(documents),
                     "num_prompts_built": len(prompts), "data": dataclasses.asdict(data_cfg)},
        "reference": evaluator.reference_metrics() if prompts else {},
        "checkpoints": {},
    }
    for path in args.checkpoints:
        model, tokenizer = _load_model(path, args.tokenizer, args.dtype)
        out: dict = {}
        t0 = time.perf_counter()
        if not args.no_perplexity:
            out.update(_perplexity(model, tokenizer, documents, data_cfg, cfg.batch_size, args.perplexity_vocab_size))
        out["perplexity_runtime"] = round(time.perf_counter() - t0, 3)
        if evaluator.generation_enabled:
            t0 = time.perf_counter()
            per_seed = evaluator.per_seed_metrics(model, tokenizer)
            for m in per_seed:
                m.pop("mauve_runtime", None)
            out.update(aggregate_seeds(per_seed))
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
