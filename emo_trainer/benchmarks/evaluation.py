"""Time one generation evaluation (the work GenerationEvalCallback does at every eval step).

    # quickstart-sized: a trained quickstart checkpoint (or --fresh quickstart), 500 prompts
    python benchmarks/bench_eval.py --model runs/quickstart/final --documents builtin:quickstart \\
        --prompt-words 8 --continuation-words 24 --max-new-tokens 32 --featurizer hashing
    # GPT-2-small size (124M, random weights: the timing does not depend on them), WikiText prompts
    python benchmarks/bench_eval.py --fresh gpt2-small --tokenizer /path/to/gpt2-tokenizer \\
        --documents /path/to/wikitext-2-raw/wiki.valid.raw --featurizer /models/gpt2-large

Runs the evaluation twice: the first includes loading the featurizer and featurizing the
reference texts (cached afterwards), the second is what every later evaluation costs. Prints a
breakdown (sampling, featurizing references / generations, k-means + MAUVE, repetition), wall
and CPU seconds (on a shared machine the CPU time is the number to trust), and writes it as
JSON with ``--output``. See docs/evaluation.md for measured numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time one evaluation of the generation metrics.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a causal-LM checkpoint directory")
    src.add_argument("--fresh", help="random weights of this size: quickstart, gpt2-small, or a config.json path")
    p.add_argument("--tokenizer", help="tokenizer path (default: the checkpoint's; required with --fresh gpt2-small)")
    p.add_argument("--documents", default="builtin:quickstart", help="builtin:quickstart or a .txt file (one per line)")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--continuation-words", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--featurizer", default="hashing")
    p.add_argument("--featurizer-batch-size", type=int, default=16)
    p.add_argument("--kmeans-num-redo", type=int, default=5, help="eval.mauve_kmeans_num_redo")
    p.add_argument("--kmeans-max-iter", type=int, default=500, help="eval.mauve_kmeans_max_iter")
    p.add_argument("--repeats", type=int, default=2, help="evaluations to run (the first pays the one-off costs)")
    p.add_argument("--threads", type=int, help="torch and faiss threads (default: theirs); 1 on an oversubscribed CPU")
    p.add_argument("--output", help="write the timings as JSON here")
    return p


class TimedFeaturizer:
    """Wraps a featurizer and accumulates the (wall, CPU) time spent in it."""

    def __init__(self, inner):
        self.inner, self.wall, self.cpu, self.calls = inner, 0.0, 0.0, []

    @property
    def name(self):
        return self.inner.name

    def __call__(self, texts):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner(texts)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.calls.append(len(texts))
        return out


class Stopwatch:
    """``with watch("part"):`` accumulates wall and CPU seconds (CPU: this process, all threads)."""

    def __init__(self):
        self.parts: dict[str, dict[str, float]] = {}

    def __call__(self, part: str):
        watch = self

        class _Ctx:
            def __enter__(self):
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                d = watch.parts.setdefault(part, {"wall_s": 0.0, "cpu_s": 0.0})
                d["wall_s"] += time.perf_counter() - self.t0
                d["cpu_s"] += time.process_time() - self.c0

        return _Ctx()


def _documents(spec: str, n: int) -> list[str]:
    if spec == "builtin:quickstart":
        from emo_trainer.quickstart_corpus import make_corpus

        return make_corpus(max(2 * n, 600), seed=123)  # same grammar as the quickstart, not its training docs
    return Path(spec).read_text(encoding="utf-8").splitlines()


def _model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise SystemExit(f"error: --model {args.model}: not a model directory (no config.json); train one first "
                             f"(e.g. the README quickstart: runs/quickstart/final) or time --fresh quickstart")
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(), tok
    if args.fresh == "quickstart":
        from emo_trainer.modeling import train_bpe_tokenizer
        from emo_trainer.quickstart_corpus import quickstart_splits

        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else \
            train_bpe_tokenizer(quickstart_splits(seed=0)["train"], 512)
        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=len(tok),
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    else:
        if not args.tokenizer:
            raise SystemExit(f"--fresh {args.fresh} needs --tokenizer (e.g. /path/to/gpt2-tokenizer)")
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        if args.fresh == "gpt2-small":
            # GPT-2 small: 12 layers, 768 wide, 1024 positions
            config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        else:
            config = GPT2Config.from_pretrained(args.fresh)
            config.dtype = "float32"
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval(), tok


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    t0 = time.perf_counter()
    import mauve  # noqa: F401  (mauve-text + faiss + sklearn: a one-off import cost, reported apart)

    import_seconds = time.perf_counter() - t0
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    from emo_trainer.evaluation import build_generation_callback
    from emo_trainer.evaluation.config import EvalConfig
    from emo_trainer.evaluation.generation import generate_continuations
    from emo_trainer.evaluation.metrics.mauve import get_featurizer
    from emo_trainer.evaluation.metrics.repetition import mean_length, repetition_metrics

    model, tok = _model(args)
    cfg = EvalConfig(num_prompts=args.num_prompts, prompt_words=args.prompt_words,
                     continuation_words=args.continuation_words, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, mauve_featurizer=args.featurizer,
                     featurizer_batch_size=args.featurizer_batch_size, mauve_kmeans_num_redo=args.kmeans_num_redo,
                     mauve_kmeans_max_iter=args.kmeans_max_iter)
    cb = build_generation_callback(cfg, _documents(args.documents, args.num_prompts), tok)
    feat = TimedFeaturizer(get_featurizer(cfg.mauve_featurizer, cfg.mauve_max_text_length, cfg.featurizer_batch_size,
                                          cfg.mauve_pooling, cfg.mauve_device))
    cb._featurizer = feat
    prefixes = [p.prefix for p in cb.prompts]
    runs = []
    for i in range(args.repeats):  # the steps of GenerationEvalCallback.per_seed_metrics, timed one by one
        feat.wall = feat.cpu = 0.0
        feat.calls = []
        watch = Stopwatch()
        with watch("total"):
            with watch("sampling"):
                continuations = generate_continuations(model, tok, prefixes, cfg, seed=cfg.seeds[0])
            with watch("repetition"):
                repetition_metrics(continuations)
            with watch("mauve_total"):  # featurize (references only the first time) + PCA/k-means
                score = cb.mauve_metrics(continuations)
        parts = {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in watch.parts.items()}
        parts["featurizer"] = {"wall_s": round(feat.wall, 2), "cpu_s": round(feat.cpu, 2), "texts": feat.calls}
        runs.append({"evaluation": i + 1, **parts, "mean_length_words": round(mean_length(continuations), 1),
                     "mauve_score": round(score["mauve"], 4)})
        print(json.dumps(runs[-1]), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "model": args.model or f"fresh {args.fresh}", "parameters": n_params, "featurizer": args.featurizer,
        "num_prompts": len(cb.prompts), "prompt_words": args.prompt_words,
        "continuation_words": args.continuation_words, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "kmeans": f"{args.kmeans_num_redo}x{args.kmeans_max_iter}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "mauve_import_s": round(import_seconds, 2), "evaluations": runs,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "evaluations"}))
    return 0

