"""``scripts/known_p_lab.py``: the known-P lab: train every objective on languages whose distribution P is known.

Draws first-order Markov languages (MixCE's synthetic setting), writes their datasets, trains
a neural bigram model (plain loop) and a tiny GPT-2 (through ``ObjectiveTrainer``) with MLE,
MixCE over an η grid, EMO, MiLe and SequenceMatch (offline and with sampling) over several
seeds and vocabulary sizes, and measures each against the true chain exactly: average per-row
JS divergence, forward/reverse KL per token, mass on impossible transitions.

Writes to ``--output-dir``: ``results.json`` (every run), ``results.md`` (mean ± std tables),
``known_p.png`` (JS against MixCE η), ``data/V{V}-s{seed}/`` (the datasets).

    python scripts/known_p_lab.py --output-dir runs/known_p            # CPU grid: ~13 CPU-minutes
    python scripts/known_p_lab.py --output-dir runs/known_p_full --full  # paper scale (sized for a GPU)
    python scripts/known_p_lab.py --families bigram --vocab-sizes 20 --seeds 0 --objectives mle mixce
    python scripts/known_p_lab.py --families bigram --output-dir runs/kp_b &  # one process per family ...
    python scripts/known_p_lab.py --families gpt2 --output-dir runs/kp_g; wait
    python scripts/known_p_lab.py --merge runs/kp_b runs/kp_g --output-dir runs/known_p   # ... one report
    python scripts/known_p_lab.py --data-only --vocab-sizes 20 --seeds 0       # datasets for scripts/train.py
    python scripts/known_p_lab.py --evaluate runs/known_p_gpt2/final --data runs/known_p/data/V20-s0

See docs/known_p.md for the definitions and a measured table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import UserError


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/known_p", help="where results, plot and datasets go")
    p.add_argument("--full", action="store_true", help="paper-scale grid (V up to 1000, 50k sequences); sized for a GPU")
    p.add_argument("--families", nargs="+", choices=("bigram", "gpt2"), help="model families (default: both)")
    p.add_argument("--vocab-sizes", nargs="+", type=int, help="vocabulary sizes for every selected family")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (each: a new language and a new initialisation)")
    p.add_argument("--objectives", nargs="+", metavar="NAME",
                   help="registry names to keep (mle mixce emo mile sequencematch dft tailr focal eaft); "
                        "default: all configured")
    p.add_argument("--etas", nargs="+", type=float, help="MixCE η grid (default 0 0.1 0.5 0.9 0.99; η=1 is MLE)")
    p.add_argument("--sm-sample-every", type=int, default=20,
                   help="SequenceMatch sampling variant: refill the replay buffer every N steps")
    p.add_argument("--num-train", type=int, help="training sequences per language")
    p.add_argument("--num-eval", type=int, help="held-out sequences (GPT-2 metrics)")
    p.add_argument("--max-length", type=int, help="maximum tokens per sequence (<eos> included)")
    p.add_argument("--eos-prob", type=float, help="fix P(<eos>|word) (default: <eos> is an ordinary Dirichlet column)")
    p.add_argument("--zero-fraction", type=float, help="fraction of zeroed transitions per row (default 0.5)")
    p.add_argument("--steps", type=int, help="optimizer steps for every selected family")
    p.add_argument("--gpt2-path", choices=("trainer", "loop"), default="trainer",
                   help="train the GPT-2 family with ObjectiveTrainer (default) or the plain loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.md and the plot from results.json")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="merge the results.json of several lab runs (e.g. one per family) into --output-dir")
    p.add_argument("--data-only", action="store_true",
                   help="only write the grid's datasets (output-dir/data/V{V}-s{seed}/) for scripts/train.py")
    p.add_argument("--evaluate", metavar="MODEL_DIR",
                   help="print the exact metrics of a saved model against the chain of --data (then exit)")
    p.add_argument("--data", metavar="DATA_DIR", help="a dataset folder written by the lab (with --evaluate)")
    return p


class LabError(UserError):
    """A user error: one ``error:`` line, exit code 2."""


def check_evaluate_inputs(model_dir: str, data_dir: str) -> None:
    """``--evaluate``: the model folder and the lab dataset exist, and the model's vocabulary is the
    dataset's (a model of another language would give meaningless "exact" metrics)."""
    model, data = Path(model_dir), Path(data_dir)
    if not (model / "config.json").is_file():
        raise LabError(f"--evaluate {model}: not a saved model folder (no config.json); pass a run's final/ folder")
    if not (data / "meta.json").is_file() or not (data / "chain.npz").is_file():
        raise LabError(f"--data {data}: not a lab dataset folder (no meta.json/chain.npz); "
                       f"make one with --data-only (folders are <output-dir>/data/V<V>-s<seed>/)")
    meta = json.loads((data / "meta.json").read_text())
    config = json.loads((model / "config.json").read_text())
    want, got = meta.get("model_vocab_size"), config.get("vocab_size")
    if want is not None and got is not None and int(want) != int(got):
        raise LabError(f"--evaluate {model}: the model has {got} tokens but the language of {data} has {want}; "
                       f"evaluate a model trained on that dataset")


def build_config(args: argparse.Namespace):
    from .lab import DEFAULT_ETAS, LabConfig, default_objective_specs

    config = LabConfig.full() if args.full else LabConfig.default()
    if args.families:
        config.families = {k: v for k, v in config.families.items() if k in args.families}
    for fam in config.families.values():
        if args.vocab_sizes:
            fam.vocab_sizes = tuple(args.vocab_sizes)
        if args.steps:
            fam.steps = args.steps
    if args.seeds is not None:
        config.seeds = tuple(args.seeds)
    for name in ("num_train", "num_eval", "max_length", "eos_prob", "zero_fraction"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    specs = default_objective_specs(tuple(args.etas) if args.etas else DEFAULT_ETAS, args.sm_sample_every)
    if args.objectives:
        known = sorted({s.name for s in specs})
        unknown = [o for o in args.objectives if o not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LabError(f"--objectives: unknown '{unknown[0]}'{hint}; choose from {', '.join(known)}")
        specs = [s for s in specs if s.name in set(args.objectives)]
    config.objectives = specs
    config.gpt2_path = args.gpt2_path
    return config


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(parser, args, out)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(parser, args, out: Path) -> int:
    from .lab import (
        evaluate_checkpoint,
        merge_results,
        plot_results,
        results_markdown,
        run_lab,
        write_datasets,
    )

    if args.evaluate:
        if not args.data:
            parser.error("--evaluate needs --data DATA_DIR (the dataset the model was trained on)")
        check_evaluate_inputs(args.evaluate, args.data)
        print(json.dumps(evaluate_checkpoint(args.evaluate, args.data), indent=2))
        return 0
    if args.data_only:
        for d in write_datasets(build_config(args), out):
            print(d)
        return 0
    if args.merge:
        results = merge_results([json.loads((Path(d) / "results.json").read_text()) for d in args.merge])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    elif args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        config = build_config(args)
        if not config.objectives:
            print("no objective selected", file=sys.stderr)
            return 2
        results = run_lab(config, out)
    (out / "results.md").write_text(results_markdown(results) + "\n")
    plot_results(results, out / "known_p.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'known_p.png'}")
    return 0

