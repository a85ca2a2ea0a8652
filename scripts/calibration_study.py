#!/usr/bin/env python
"""The calibration study: one pretrained checkpoint, calibrated with every objective, evaluated alike.

    python scripts/calibration_study.py --output-dir runs/study            # full scale (GPU)
    python scripts/calibration_study.py --output-dir runs/study --sentences 800 --num-prompts 200 ...

What it does, top to bottom:

1. builds the calibration set ONCE from ``--train-file`` with the config's sentence splitter
   (pysbd; headings, lines under ``calibration_min_words`` words and ``<unk>`` sentences dropped;
   ``--sentences`` sampled with ``training.seed``) and writes ``<output-dir>/calibration_set.txt``;
2. for each objective, calibrates ``--model`` through the normal config path
   (``emo_trainer.cli.run(load_config(--config, overrides))``): the overrides are the same for
   every objective except ``--objective X``, so data, blocks, steps, lr, schedule and seed are
   identical; "no calibration" is the checkpoint itself;
3. evaluates every model on ``--test-file`` (WikiText-2 test, raw, detokenized like the training
   text unless ``--no-detokenize-test``): token-weighted perplexity (plain CE, 256-token packed
   blocks, the first ``--ppl-blocks`` of them), and for each sampling seed one continuation per
   prompt (pure sampling), MAUVE (featurizer ``--featurizer``, default the frozen base checkpoint;
   reference features computed once for all models), rep-2/3/4, diversity, seq-rep-4,
   distinct-n; the human values are the same metrics on the reference continuations;
4. writes ``results.json`` (the ``scripts/evaluate.py`` layout, per-seed values included),
   ``results.md`` (the table), ``results.png`` (bars with ± std over seeds) and
   ``train_loss.png``, and runs ``scripts/compare.py`` on ``results.json`` (``compare.md``).

Every model's results go to ``<output-dir>/<name>/eval.json`` as soon as it is done, and a model
whose ``eval.json`` exists is not redone: re-running the same command resumes the study (other
``--objectives`` may be added).  The settings are kept in ``study_settings.json``; re-running with
different ones stops with an error instead of mixing models made differently.
``--jobs N`` runs N models at a time (``--threads`` torch threads each).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The workspace's shared assets, written relative to the working directory (``../shared`` from the
#: repository root, as in the docs), so the defaults work from any directory.
SHARED = os.path.relpath(REPO.parent / "shared")
sys.path.insert(0, str(REPO))  # run from a checkout without installing

logger = logging.getLogger("emo_trainer.calibration_study")

LABELS = {"none": "no calibration", "mle": "MLE", "emo": "EMO", "mixce": "MixCE", "mile": "MiLe",
          "sequencematch": "SequenceMatch", "dft": "DFT", "tailr": "TaiLr", "focal": "focal", "eaft": "EAFT"}
METRICS = ["perplexity", "mauve", "diversity", "rep_2", "rep_3", "rep_4", "seq_rep_4", "distinct_2", "mean_length"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate one checkpoint with each objective and evaluate all alike.")
    p.add_argument("--config", default=str(REPO / "configs/calibrate_emo.yaml"), help="base calibration config")
    p.add_argument("--model", default=f"{SHARED}/models/gpt2-gutenberg-30m", help="pretrained checkpoint")
    p.add_argument("--train-file", default=f"{SHARED}/data/wikitext-2/wiki.train.tokens",
                   help="calibration documents (one per line)")
    p.add_argument("--valid-file", default=f"{SHARED}/data/wikitext-2-raw/wiki.valid.raw",
                   help="validation documents (end-of-training eval loss only)")
    p.add_argument("--test-file", default=f"{SHARED}/data/wikitext-2-raw/wiki.test.raw", help="test documents")
    p.add_argument("--detokenize", default="wikitext", help="data.detokenize for the calibration text ('none' = off)")
    p.add_argument("--no-detokenize-test", action="store_true", help="evaluate on the test text exactly as in the file")
    p.add_argument("--objectives", nargs="+",
                   default=["none", "mle", "emo", "mixce", "mile", "sequencematch", "dft", "tailr", "focal", "eaft"],
                   help="'none' = the uncalibrated checkpoint; the rest are objective names")
    p.add_argument("--output-dir", default="runs/study")
    # calibration
    p.add_argument("--sentences", type=int, default=25000, help="data.calibration_sentences")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="the same for every objective")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="per-device train batch size")
    p.add_argument("--seed", type=int, default=42, help="training seed = calibration-set sampling seed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every calibration run (e.g. emo.mode=1 bf16=true)")
    # evaluation
    p.add_argument("--featurizer", default=None, help="MAUVE featurizer (default: --model, frozen)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--continuation-words", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--ppl-blocks", type=int, default=None, help="first N packed test blocks (default: all)")
    p.add_argument("--mauve-kmeans-num-redo", type=int, default=5)
    # execution
    p.add_argument("--jobs", type=int, default=1, help="models calibrated/evaluated at the same time")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: torch's)")
    p.add_argument("--docs-dir", default=None, help="also copy results.json/.md/.png here (e.g. docs/results)")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild results.json/.md/.png from the models already evaluated")
    return p


# --------------------------------------------------------------------------- pieces


def test_documents(args) -> list[str]:
    from emo_trainer.data import detokenize_wikitext

    lines = Path(args.test_file).read_text(encoding="utf-8").splitlines()
    if args.detokenize != "none" and not args.no_detokenize_test:
        lines = [detokenize_wikitext(x) for x in lines]
    return [x for x in lines if x.strip()]


def eval_config(args):
    from emo_trainer.eval_config import EvalConfig

    return EvalConfig(
        num_prompts=args.num_prompts, prompt_words=args.prompt_words, continuation_words=args.continuation_words,
        max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, seeds=tuple(args.seeds),
        mauve_featurizer=args.featurizer or args.model, mauve_kmeans_num_redo=args.mauve_kmeans_num_redo,
        mauve_device="cpu" if not _cuda() else "auto",
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prompts_of(args):
    from emo_trainer.prompts import build_prompts

    return build_prompts(test_documents(args), args.prompt_words, args.continuation_words, args.num_prompts)


def featurizer_of(args):
    from emo_trainer.metrics.mauve import get_featurizer

    c = eval_config(args)
    return get_featurizer(c.mauve_featurizer, c.mauve_max_text_length, c.featurizer_batch_size, c.mauve_pooling,
                          c.mauve_device)


def calibration_overrides(args, objective: str, out: Path) -> list[str]:
    """The overrides of one calibration run: identical for every objective except objective.name."""
    calib = out / "calibration_set.txt"
    return [
        f"--objective={objective}",
        f"--model.name_or_path={args.model}",
        "--data.dataset=null",
        f"--data.train_files=[{calib}]",       # the shared calibration set, one sentence per line
        f"--data.validation_files=[{validation_file(args, out)}]",
        "--data.calibration_sentences=null",    # already sampled (step 1)
        "--data.detokenize=null",               # the set is already detokenized (not idempotent)
        "--data.max_eval_samples=50",           # end-of-training eval loss on a few documents only
        f"--data.block_size={args.block_size}",
        "--eval.generation=false",              # evaluated below, identically for every model
        f"--training.output_dir={out / objective}",
        f"--training.learning_rate={args.learning_rate}",
        f"--training.per_device_train_batch_size={args.batch_size}",
        f"--training.per_device_eval_batch_size={args.batch_size}",
        f"--training.seed={args.seed}",
        "--training.report_to=none",
        *[s if s.startswith("--") else f"--{s}" for s in args.set],
    ]


def validation_file(args, out: Path, write: bool = False) -> Path:
    """The validation text of the end-of-training eval, detokenized like the calibration text.

    The runs switch ``data.detokenize`` off (the calibration set is already detokenized, and the
    WikiText detokenizer is not idempotent), which would leave the raw validation file
    undetokenized — a different text format from training and test.  ``write`` makes the copy
    (once, before the runs)."""
    if args.detokenize in (None, "none", "null"):
        return Path(args.valid_file)
    path = out / "validation.txt"
    if write:
        from emo_trainer.data import detokenize_wikitext

        lines = Path(args.valid_file).read_text(encoding="utf-8").splitlines()
        path.write_text("\n".join(detokenize_wikitext(x) for x in lines) + "\n", encoding="utf-8")
    return path


def build_calibration_set(args, out: Path) -> list[str]:
    """Step 1: the calibration set from the train documents, exactly as ``build_trainer`` builds it."""
    from emo_trainer.config import load_config
    from emo_trainer.data import calibration_set, load_raw_splits

    path, meta_path = out / "calibration_set.txt", out / "calibration_set.json"
    meta = {"train_file": str(args.train_file), "sentences": args.sentences, "seed": args.seed,
            "detokenize": args.detokenize, "config": str(args.config)}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return path.read_text(encoding="utf-8").splitlines()
    cfg = load_config(args.config, [
        f"--model.name_or_path={args.model}", "--data.dataset=null", f"--data.train_files=[{args.train_file}]",
        f"--data.validation_files=[{validation_file(args, out)}]",
        f"--data.detokenize={'null' if args.detokenize == 'none' else args.detokenize}",
        f"--data.calibration_sentences={args.sentences}", f"--training.seed={args.seed}",
    ])
    raw = load_raw_splits(cfg.data, seed=args.seed)
    sents = calibration_set(raw["train"][cfg.data.text_column], args.sentences, seed=args.seed,
                            min_words=cfg.data.calibration_min_words)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sents) + "\n", encoding="utf-8")
    meta_path.write_text(json.dumps(meta))
    return sents


def reference_features(args, out: Path, prompts):
    """MAUVE's p features (prefix + human continuation), computed once for every model."""
    import numpy as np

    from emo_trainer.metrics.mauve import featurize

    path, key_path = out / "reference_features.npy", out / "reference_features.key"
    feat = featurizer_of(args)
    texts = [p.human_text for p in prompts]
    key = hashlib.sha256("\x00".join([str(args.featurizer or args.model), *texts]).encode()).hexdigest()
    if path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return np.load(path)
    feats = featurize(feat, texts)
    np.save(path, feats)
    key_path.write_text(key)
    return feats


def perplexity(model, tokenizer, documents, block_size: int, max_blocks: int | None, vocab_size: int | None) -> dict:
    import datasets
    import torch

    from emo_trainer.config import DataConfig
    from emo_trainer.data import CausalLMCollator, tokenize_splits
    from emo_trainer.metrics.perplexity import dataloader_nll, perplexity_from_totals

    dcfg = DataConfig(train_files=["-"], block_size=block_size)
    blocks = tokenize_splits(datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": documents})}),
                             tokenizer, dcfg)["test"]
    if max_blocks is not None:
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    loader = torch.utils.data.DataLoader(blocks, batch_size=8, collate_fn=CausalLMCollator(tokenizer.pad_token_id))
    nll, tokens = dataloader_nll(model, loader, vocab_size=vocab_size)
    return {"perplexity": perplexity_from_totals(nll, tokens), "nll": nll / tokens, "ppl_tokens": tokens,
            "ppl_blocks": len(blocks)}


def evaluate_model(args, name: str, model_dir: str, out: Path) -> dict:
    """Perplexity + per-seed generation metrics of one model; samples kept in <name>/samples.jsonl."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emo_trainer.backspace import backspace_token_id
    from emo_trainer.evaluation import aggregate_seeds
    from emo_trainer.generation import generate_continuations
    from emo_trainer.metrics.mauve import compute_mauve, featurize
    from emo_trainer.metrics.repetition import repetition_metrics

    cfg = eval_config(args)
    prompts = prompts_of(args)
    ref = np.load(out / "reference_features.npy")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if _cuda():
        model = model.cuda()
    bk = backspace_token_id(tokenizer)
    sampler, vocab = None, None
    if bk is not None:  # SequenceMatch: backspace-aware sampling, perplexity over the original vocabulary
        from emo_trainer.backspace_generation import sample_continuations_with_backspace

        sampler, vocab = sample_continuations_with_backspace, bk
    t0 = time.perf_counter()
    result = perplexity(model, tokenizer, test_documents(args), args.block_size, args.ppl_blocks, vocab)
    result["perplexity_runtime"] = round(time.perf_counter() - t0, 1)
    feat = featurizer_of(args)
    per_seed, samples = [], {}
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        texts = generate_continuations(model, tokenizer, [p.prefix for p in prompts], cfg, seed=seed, sampler=sampler)
        m = repetition_metrics(texts)
        q = featurize(feat, [p.with_continuation(t) for p, t in zip(prompts, texts)])
        m.update(compute_mauve(ref, q, scaling_factor=cfg.mauve_scaling_factor, kmeans_seed=cfg.mauve_kmeans_seed,
                               kmeans_num_redo=cfg.mauve_kmeans_num_redo, kmeans_max_iter=cfg.mauve_kmeans_max_iter))
        per_seed.append(m)
        samples[seed] = texts
        logger.info("%s seed %d: mauve %.4f diversity %.4f", name, seed, m["mauve"], m["diversity"])
    result.update(aggregate_seeds(per_seed))
    result["per_seed"] = per_seed
    result["generation_runtime"] = round(time.perf_counter() - t0, 1)
    with open(out / name / "samples.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prefix": p.prefix, "reference": p.reference,
                                 **{f"seed{s}": samples[s][i] for s in cfg.seeds}}) + "\n" for i, p in enumerate(prompts))
    return result


def run_one(args, objective: str) -> dict:
    """Calibrate (unless 'none') and evaluate one model; resumable via <name>/eval.json."""
    out = Path(args.output_dir)
    res_path = out / objective / "eval.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    (out / objective).mkdir(parents=True, exist_ok=True)
    info: dict = {"objective": objective, "label": LABELS.get(objective, objective)}
    t0 = time.perf_counter()
    if objective == "none":
        model_dir = args.model
    else:
        from emo_trainer.cli import run
        from emo_trainer.config import load_config
        from emo_trainer.trainer import last_complete_checkpoint

        model_dir = str(out / objective / "final")
        if not (Path(model_dir) / "config.json").is_file():
            cfg = load_config(args.config, calibration_overrides(args, objective, out))
            # an interrupted calibration resumes from its last complete checkpoint (a half-written
            # later one is skipped); one that died before its first checkpoint starts over
            resume = "true" if last_complete_checkpoint(out / objective) else None
            metrics = run(cfg, resume_from_checkpoint=resume, overwrite_output_dir=True)
            info["train_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        info["train_runtime"] = round(time.perf_counter() - t0, 1)
    info["model_dir"] = model_dir
    t1 = time.perf_counter()
    info.update(evaluate_model(args, objective, model_dir, out))
    info["eval_runtime"] = round(time.perf_counter() - t1, 1)
    res_path.write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- outputs


def _fmt(v, std=None, digits=4) -> str:
    if v is None:
        return "–"
    s = f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return f"{s} ± {std:.2g}" if std is not None else s


def markdown(results: dict) -> str:
    cols = [("perplexity", "test ppl ↓"), ("mauve", "MAUVE ↑"), ("diversity", "diversity"), ("rep_2", "rep-2"),
            ("rep_3", "rep-3"), ("rep_4", "rep-4"), ("seq_rep_4", "seq-rep-4"), ("distinct_2", "distinct-2"),
            ("mean_length", "words")]
    lines = ["| model | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in results["checkpoints"].items():
        cells = [_fmt(r.get(k), r.get(f"{k}_std")) for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = results["reference"]
    cells = ["–", "–"] + [_fmt(ref.get(k)) for k, _ in cols[2:]]
    lines.append("| human (reference continuations) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["checkpoints"])
    n_seeds = max((len(c.get("per_seed", [])) for c in results["checkpoints"].values()), default=0)
    panels = [("perplexity", "test perplexity (log)"), ("mauve", f"MAUVE (± std, {n_seeds} seeds)"),
              ("diversity", "diversity (human dashed)"), ("rep_2", "rep-2 (human dashed)"),
              ("seq_rep_4", "seq-rep-4 (human dashed)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, panels):
        vals = [results["checkpoints"][n].get(key) for n in names]
        errs = [results["checkpoints"][n].get(f"{key}_std", 0.0) for n in names]
        ax.bar(range(len(names)), [v if v is not None else 0 for v in vals], yerr=errs if any(errs) else None, capsize=3,
               color=[colors[i % len(colors)] for i in range(len(names))])
        if key in results["reference"]:
            ax.axhline(results["reference"][key], color="black", linestyle="--", linewidth=1)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(out: Path, objectives: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    drawn = False
    for obj in objectives:
        state = out / obj / "trainer_state.json"
        if not state.is_file():
            continue
        hist = json.loads(state.read_text())["log_history"]
        pts = [(h["step"], h["train/ce"] if "train/ce" in h else h.get("ce")) for h in hist]
        pts = [(s, v) for s, v in pts if v is not None]
        if not pts:
            pts = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=LABELS.get(obj, obj))
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("training CE (or loss)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args, out: Path, sizing: dict) -> dict:
    from emo_trainer.metrics.repetition import repetition_metrics

    prompts = prompts_of(args)
    results = {
        "protocol": {"model": args.model, "featurizer": args.featurizer or args.model, "test_file": args.test_file,
                     "detokenized_test": args.detokenize != "none" and not args.no_detokenize_test,
                     "eval": dataclasses.asdict(eval_config(args)), "num_prompts_built": len(prompts), **sizing},
        "reference": repetition_metrics([p.reference for p in prompts]),
        "checkpoints": {},
        "missing": [],
    }
    for obj in args.objectives:
        path = out / obj / "eval.json"
        if path.is_file():
            results["checkpoints"][LABELS.get(obj, obj)] = json.loads(path.read_text())
        else:
            results["missing"].append(obj)
    return results


def write_outputs(args, out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    if results["checkpoints"]:
        plot(results, out / "results.png")
    plot_training(out, [o for o in args.objectives if o != "none"], out / "train_loss.png")
    # scripts/compare.py reads the scripts/evaluate.py layout, where the human values are ``ref_*`` keys.
    compat = {**results, "reference": {f"ref_{k}": v for k, v in results["reference"].items()}}
    (out / "compare_input.json").write_text(json.dumps(compat))
    subprocess.run([sys.executable, str(REPO / "scripts/compare.py"), str(out / "compare_input.json"),
                    "--output-dir", str(out)], check=False, stdout=subprocess.DEVNULL)
    if args.docs_dir:
        import shutil

        docs = Path(args.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        slim = {k: v for k, v in results.items()}
        slim["checkpoints"] = {n: {k: v for k, v in r.items() if k != "train_metrics"}
                               for n, r in results["checkpoints"].items()}
        (docs / "results.json").write_text(json.dumps(slim, indent=2))
        for name in ("results.md", "results.png", "train_loss.png", "compare.md"):
            if (out / name).is_file():
                shutil.copy(out / name, docs / name)


def sizing_of(args, num_sentences: int) -> dict:
    return {"calibration_sentences": num_sentences, "learning_rate": args.learning_rate,
            "block_size": args.block_size, "batch_size": args.batch_size, "seed": args.seed,
            "ppl_blocks": args.ppl_blocks, "overrides": args.set, "command": " ".join(sys.argv)}


#: Arguments that do not change any result: a study may be resumed with other values of these.
_EXECUTION_ARGS = ("objectives", "output_dir", "jobs", "threads", "docs_dir", "report_only")


def check_settings(args, out: Path) -> str | None:
    """A study directory is resumed only with the settings it was made with (``study_settings.json``):
    models cached in ``<name>/eval.json`` would otherwise be mixed with ones made differently.
    Returns an error message, or None (and records the settings of a new study)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _EXECUTION_ARGS}
    path = out / "study_settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r} → {v!r}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            return (f"--output-dir {out} holds a study made with other settings ({'; '.join(changed)}): its cached "
                    f"models would be mixed with new ones; use another --output-dir, or delete it to start over")
        return None
    path.write_text(json.dumps(settings, indent=2))
    return None


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load ... AVX2": harmless
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.report_only:
        sents = (out / "calibration_set.txt").read_text(encoding="utf-8").splitlines()
        results = collect(args, out, sizing_of(args, len(sents)))
        write_outputs(args, out, results)
        print(markdown(results))
        return 0
    problem = check_settings(args, out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    sents = build_calibration_set(args, out)
    validation_file(args, out, write=True)
    logger.info("calibration set: %d sentences in %s", len(sents), out / "calibration_set.txt")
    prompts = prompts_of(args)
    reference_features(args, out, prompts)
    logger.info("reference features of %d prompts cached in %s", len(prompts), out / "reference_features.npy")
    sizing = sizing_of(args, len(sents))
    failed = {}
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, args, obj): obj for obj in args.objectives}
            for fut in cf.as_completed(futures):
                obj = futures[fut]
                try:
                    fut.result()
                    logger.info("done: %s (%.0f s since start)", obj, time.perf_counter() - start)
                except Exception as e:  # one failing objective must not lose the others
                    failed[obj] = f"{type(e).__name__}: {e}"
                    logger.exception("failed: %s", obj)
                write_outputs(args, out, collect(args, out, sizing))
    else:
        for obj in args.objectives:
            try:
                run_one(args, obj)
            except Exception as e:
                failed[obj] = f"{type(e).__name__}: {e}"
                logger.exception("failed: %s", obj)
            write_outputs(args, out, collect(args, out, sizing))
    results = collect(args, out, sizing)
    results["failed"] = failed
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(args, out, results)
    print(markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
