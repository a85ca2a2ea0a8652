"""The known-P lab: every objective × seeds × vocabulary sizes × model families, exact metrics.

For each vocabulary size ``V`` and seed ``s`` the lab draws a language
(:func:`~emo_trainer.known_p.markov.generate_chain` with seed ``s``), writes its dataset
(``data/V{V}-s{s}/``, readable by the normal training pipeline), and trains a fresh model of
each family on exactly that ``train.jsonl`` with every objective (same initialisation, same
batches order seed, same schedule), then measures it against the true chain.  Each seed is a
new language *and* a new initialisation, so "± std" covers both; objectives are compared on
the same languages (paired).

Families:

* ``bigram`` — :class:`~emo_trainer.known_p.bigram.BigramLM` trained with the plain loop
  (:func:`~emo_trainer.known_p.training.train_loop`); metrics exact.
* ``gpt2`` — a tiny GPT-2 trained by ``ObjectiveTrainer`` (the path users run); metrics on
  held-out sequences of the true chain (:func:`~emo_trainer.known_p.metrics.contextual_metrics`).

Objectives come from the registry (``available()``); a configured objective that is not
registered (or rejects an option) is skipped and listed in the results, never faked.
"""

from __future__ import annotations

import json
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..objectives import available, get_objective, objective_options
from .markov import generate_chain, load_chain, load_sequences, make_tokenizer, write_dataset
from .metrics import METRIC_NAMES, evaluate_model, exact_metrics, mixce_fixed_point_metrics
from .training import make_model, train_loop, train_with_trainer

__all__ = [
    "FamilySettings",
    "LabConfig",
    "ObjectiveSpec",
    "dataset_dir",
    "default_objective_specs",
    "evaluate_checkpoint",
    "merge_results",
    "plot_results",
    "resolve_options",
    "results_markdown",
    "run_lab",
    "summarise",
    "write_datasets",
]

#: The MixCE η grid of the default lab (η = 1 is MLE, reported as the MLE row).
DEFAULT_ETAS = (0.0, 0.1, 0.5, 0.9, 0.99)


@dataclass
class ObjectiveSpec:
    """One row of the table: a registered objective with fixed options.

    ``mle_warmup_fraction`` (SequenceMatch): that fraction of the family's steps is plain MLE
    (``bc_warmup_steps``), since SequenceMatch is meant to start from an MLE-trained model; the
    total number of steps stays the same as every other objective's.
    """

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    mle_warmup_fraction: float = 0.0


def default_objective_specs(etas: tuple[float, ...] = DEFAULT_ETAS, sequencematch_sample_every: int = 20) -> list[ObjectiveSpec]:
    """MLE, MixCE over ``etas``, EMO, MiLe, SequenceMatch offline and with sampling, and the
    ecosystem's token-weighted objectives (DFT, TaiLr, focal, EAFT; docs/objectives.md) at their defaults.

    EMO uses the ``live`` cost embedding: training starts from random weights, where the
    ``initial`` (frozen) cost would be a random matrix (docs/objectives.md, EMO pitfalls).
    """
    specs = [ObjectiveSpec("MLE", "mle")]
    specs += [ObjectiveSpec(f"MixCE η={eta:g}", "mixce", {"eta": float(eta)}) for eta in etas]
    specs += [
        ObjectiveSpec("EMO (live cost)", "emo", {"cost_embedding": "live"}),
        ObjectiveSpec("MiLe γ=1", "mile", {"gamma": 1.0}),
        ObjectiveSpec("SequenceMatch offline", "sequencematch", {"sample_every": 0}, mle_warmup_fraction=0.5),
        ObjectiveSpec(
            f"SequenceMatch sampling/{sequencematch_sample_every}", "sequencematch",
            {"sample_every": sequencematch_sample_every}, mle_warmup_fraction=0.5,
        ),
        ObjectiveSpec("DFT", "dft"),
        ObjectiveSpec("TaiLr γ=1e-7", "tailr", {"gamma": 1e-7, "min_weight": 0.2}),
        ObjectiveSpec("focal γ=1", "focal", {"gamma": 1.0}),
        ObjectiveSpec("EAFT", "eaft", {"alpha": 1.0, "top_k": 20, "normalizer": 3.0}),
    ]
    return specs


def resolve_options(spec: ObjectiveSpec, steps: int, max_length: int, seed: int) -> dict[str, Any]:
    """The options one run uses: the spec's, plus what depends on the run.

    * ``bc_warmup_steps`` = ``mle_warmup_fraction`` × steps (when the spec has a fraction);
    * an objective with a ``seed`` option gets the run's seed (unless the spec fixes one);
    * SequenceMatch samples continuations of up to ``max_length`` tokens (so a sample can end
      with ``<eos>`` like the data) unless the spec says otherwise.
    """
    opts = dict(spec.options)
    known = objective_options(spec.name)
    if spec.mle_warmup_fraction:
        opts.setdefault("bc_warmup_steps", round(spec.mle_warmup_fraction * steps))
    if "seed" in known:
        opts.setdefault("seed", seed)
    if spec.name == "sequencematch":
        opts.setdefault("max_new_tokens", max_length)
    return opts


@dataclass
class FamilySettings:
    """Model family and its training schedule (AdamW, cosine, batches of whole sequences)."""

    vocab_sizes: tuple[int, ...]
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    model_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabConfig:
    """Everything one lab run depends on (saved into results.json)."""

    families: dict[str, FamilySettings]
    seeds: tuple[int, ...] = (0, 1, 2)
    num_train: int = 2000
    num_eval: int = 500
    max_length: int = 32
    alpha: float = 0.5
    zero_fraction: float = 0.5
    eos_prob: float | None = None
    objectives: list[ObjectiveSpec] = field(default_factory=default_objective_specs)
    #: "trainer" (ObjectiveTrainer; falls back to the loop if it cannot be imported) or "loop".
    gpt2_path: str = "trainer"

    @classmethod
    def default(cls) -> LabConfig:
        """The CPU-sized grid: about 13 CPU-minutes (7 on 2 idle cores, one process per family)."""
        return cls(families={
            "bigram": FamilySettings(vocab_sizes=(20, 100), steps=400, batch_size=64, lr=0.1),
            "gpt2": FamilySettings(vocab_sizes=(20,), steps=300, batch_size=32, lr=3e-3, warmup_steps=20),
        })

    @classmethod
    def full(cls) -> LabConfig:
        """The paper-scale setting: vocabularies 20…1000, 50k training sequences.

        Sized for a GPU (the loop and the Trainer use CUDA when present): on a CPU the full-rank
        V = 1000 bigram alone costs seconds per step.
        """
        return cls(
            families={
                "bigram": FamilySettings(vocab_sizes=(20, 50, 100, 500, 1000), steps=4000, batch_size=256, lr=0.05),
                "gpt2": FamilySettings(vocab_sizes=(20, 100, 1000), steps=8000, batch_size=64, lr=1e-3, warmup_steps=200,
                                       model_overrides={"n_embd": 128, "n_layer": 2, "n_head": 4}),
            },
            seeds=(0, 1, 2),
            num_train=50_000,
            num_eval=2000,
            max_length=64,
        )


def _check_spec(spec: ObjectiveSpec) -> str | None:
    """Why ``spec`` cannot run with this checkout (None when it can)."""
    if spec.name not in available():
        return f"objective '{spec.name}' is not registered in this checkout"
    unknown = set(spec.options) - set(objective_options(spec.name))
    if unknown:
        return f"objective '{spec.name}' has no option(s) {sorted(unknown)}"
    return None


def _counts_table(chain, sequences, pseudo_count: float = 1e-3) -> np.ndarray:
    """Closed-form bigram MLE of the data (counts + a tiny pseudo-count), a reference row."""
    k = chain.model_vocab_size
    counts = np.zeros((k, k))
    for s in sequences:
        ctx = np.concatenate([[chain.bos_id], s[:-1]])
        np.add.at(counts, (ctx, s), 1.0)
    counts[:, : chain.vocab_size + 1] += pseudo_count
    return counts / counts.sum(1, keepdims=True)


def dataset_dir(out_dir: str | Path, vocab_size: int, seed: int) -> Path:
    """Where the lab keeps the dataset of language (``vocab_size``, ``seed``)."""
    return Path(out_dir) / "data" / f"V{vocab_size}-s{seed}"


def write_datasets(config: LabConfig, out_dir: str | Path) -> list[Path]:
    """Write (or keep, if already there) the dataset of every language of the grid."""
    dirs = []
    vocab_sizes = sorted({v for fam in config.families.values() for v in fam.vocab_sizes})
    for vocab in vocab_sizes:
        for seed in config.seeds:
            data_dir = dataset_dir(out_dir, vocab, seed)
            if not (data_dir / "meta.json").exists():
                chain = generate_chain(vocab, seed=seed, alpha=config.alpha, zero_fraction=config.zero_fraction,
                                       eos_prob=config.eos_prob)
                write_dataset(chain, data_dir, config.num_train, config.num_eval, config.max_length, seed=seed)
            dirs.append(data_dir)
    return dirs


def evaluate_checkpoint(model_dir: str | Path, data_dir: str | Path, context_free: bool | None = None) -> dict[str, float]:
    """Exact metrics of a saved model (e.g. from ``scripts/train.py``) against a lab dataset's chain.

    The model is evaluated on the dataset's ``validation.jsonl`` (true-chain samples); a
    :class:`BigramLM` checkpoint is read row by row (exact).  ``max_length`` comes from the
    dataset's ``meta.json``.
    """
    from transformers import AutoModelForCausalLM

    from .bigram import BigramConfig

    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    chain = load_chain(data_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # the bigram type is registered on import
    if context_free is None:
        context_free = model.config.model_type == BigramConfig.model_type
    evalset = load_sequences(data_dir / "validation.jsonl", chain)
    return evaluate_model(model, chain, meta["max_length"], evalset, context_free=bool(context_free))


def run_lab(config: LabConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid, write ``results.json`` incrementally, return the results dict.

    ``results["runs"]`` holds one record per (family, vocab, seed, objective): the metrics,
    training seconds, final loss, which training path ran, or the error if it failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runnable, skipped = [], {}
    for spec in config.objectives:
        why = _check_spec(spec)
        if why:
            skipped[spec.label] = why
            log(f"skip {spec.label}: {why}")
        else:
            runnable.append(spec)
    results: dict[str, Any] = {
        "config": _jsonable(asdict(config)),
        "skipped": skipped,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "runs": [],
    }
    write_datasets(config, out)
    vocab_sizes = sorted({v for fam in config.families.values() for v in fam.vocab_sizes})
    for vocab in vocab_sizes:
        for seed in config.seeds:
            data_dir = dataset_dir(out, vocab, seed)
            chain = load_chain(data_dir)
            train = load_sequences(data_dir / "train.jsonl", chain)
            evalset = load_sequences(data_dir / "validation.jsonl", chain)
            for family, fam in config.families.items():
                if vocab not in fam.vocab_sizes:
                    continue
                if family == "bigram":
                    ref = exact_metrics(chain, _counts_table(chain, train), config.max_length)
                    results["runs"].append({"family": family, "vocab_size": vocab, "seed": seed,
                                            "label": "bigram counts (reference)", "objective": None,
                                            "metrics": ref, "seconds": 0.0, "path": "closed form"})
                for spec in runnable:
                    rec = _run_one(config, fam, family, spec, chain, train, evalset, seed, out)
                    rec.update({"family": family, "vocab_size": vocab, "seed": seed})
                    results["runs"].append(rec)
                    m = rec.get("metrics") or {}
                    log(f"[{family} V={vocab} seed={seed}] {spec.label:<28} "
                        + (f"JS={m['js']:.4g} FKL={m['fkl']:.4g} RKLε={m['rkl']:.4g} "
                           f"mass0={m['impossible_mass']:.3g} ({rec['seconds']:.1f}s, {rec['path']})"
                           if m else f"FAILED: {rec['error']}"))
                    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _run_one(config, fam, family, spec, chain, train, evalset, seed, out) -> dict[str, Any]:
    opts = resolve_options(spec, fam.steps, config.max_length, seed)
    rec: dict[str, Any] = {"label": spec.label, "objective": spec.name, "options": opts}
    start = time.perf_counter()
    try:
        overrides = dict(fam.model_overrides)
        if family == "gpt2":  # room for SequenceMatch samples: a data prefix + max_length new tokens
            overrides.setdefault("n_positions", 2 * config.max_length + 2)
        model = make_model(family, chain, config.max_length, seed=seed, **overrides)
        if torch.cuda.is_available():  # the loop trains on the model's device (the Trainer picks its own)
            model.to("cuda")
        tokenizer = make_tokenizer(chain)  # fresh per run: SequenceMatch adds <bkspc> to it
        if spec.name == "sequencematch":
            from ..objectives.sequencematch.backspace import add_backspace_token

            add_backspace_token(model, tokenizer)  # before any optimizer exists
        objective = get_objective(spec.name, **opts)
        common = {"steps": fam.steps, "batch_size": fam.batch_size, "lr": fam.lr,
                  "warmup_steps": fam.warmup_steps, "seed": seed, "tokenizer": tokenizer}
        path = "loop"
        if family == "gpt2" and config.gpt2_path == "trainer":
            try:
                import emo_trainer.trainer  # noqa: F401
                path = "ObjectiveTrainer"
            except ImportError as e:  # the lab still runs on a checkout without the trainer
                rec["note"] = f"ObjectiveTrainer unavailable ({e}); plain loop used"
        if path == "ObjectiveTrainer":
            logs = train_with_trainer(model, objective, chain, train, str(out / "trainer_tmp"), **common)
        else:
            logs = train_loop(model, objective, chain, train, **common)
        rec["path"] = path
        rec["final_train_logs"] = {k: v for k, v in (logs[-1] if logs else {}).items() if isinstance(v, (int, float))}
        rec["metrics"] = evaluate_model(model, chain, config.max_length, evalset, context_free=family == "bigram")
    except Exception as e:  # noqa: BLE001 — one diverging/broken objective must not kill the grid
        rec["path"] = rec.get("path", "-")
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=4)
    rec["seconds"] = time.perf_counter() - start
    return rec


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs of parts of a grid (e.g. one process per family).

    Families and runs are concatenated; the other settings must agree (a clear error otherwise).
    """
    if not parts:
        raise ValueError("nothing to merge")
    merged = json.loads(json.dumps(parts[0]))
    for part in parts[1:]:
        for key, value in part["config"].items():
            if key not in ("families", "objectives") and merged["config"].get(key) != value:
                raise ValueError(f"cannot merge lab results with different '{key}': {merged['config'].get(key)} vs {value}")
        for family, fam in part["config"]["families"].items():
            if family in merged["config"]["families"] and merged["config"]["families"][family] != fam:
                raise ValueError(f"cannot merge two different settings of family '{family}'")
            merged["config"]["families"][family] = fam
        merged["runs"] += part["runs"]
        merged["skipped"].update(part.get("skipped", {}))
    return merged


# ---------------------------------------------------------------------- reporting
def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (family, vocab, label), in the order rows first appear.

    Also the paired difference of JS to MLE on the same language (mean ± std over seeds), and
    for MixCE rows ``theory_js``: the JS to P of MixCE(η)'s own optimum
    (:func:`~emo_trainer.known_p.metrics.mixce_fixed_point`) on the same languages, rebuilt
    from the config's generation settings.
    """
    cfg = results["config"]
    chains: dict[tuple[int, int], Any] = {}

    def theory_js(vocab: int, seed: int, eta: float) -> float:
        if (vocab, seed) not in chains:
            chains[(vocab, seed)] = generate_chain(vocab, seed=seed, alpha=cfg["alpha"],
                                                   zero_fraction=cfg["zero_fraction"], eos_prob=cfg["eos_prob"])
        return mixce_fixed_point_metrics(chains[(vocab, seed)], eta, cfg["max_length"])["js"]

    groups: dict[tuple, list[dict]] = {}
    for rec in results["runs"]:
        groups.setdefault((rec["family"], rec["vocab_size"], rec["label"]), []).append(rec)
    mle_js = {(r["family"], r["vocab_size"], r["seed"]): r["metrics"]["js"]
              for r in results["runs"] if r["label"] == "MLE" and r.get("metrics")}
    rows = []
    for (family, vocab, label), recs in groups.items():
        ok = [r for r in recs if r.get("metrics")]
        row = {"family": family, "vocab_size": vocab, "label": label, "n": len(ok), "failed": len(recs) - len(ok),
               "objective": recs[0].get("objective"), "options": recs[0].get("options", {})}
        for name in METRIC_NAMES:
            vals = np.array([r["metrics"][name] for r in ok], dtype=float)
            row[name] = _mean_std(vals)
        diffs = np.array([r["metrics"]["js"] - mle_js[(family, vocab, r["seed"])] for r in ok
                          if (family, vocab, r["seed"]) in mle_js], dtype=float)
        row["js_minus_mle"] = _mean_std(diffs)
        eta = (row["options"] or {}).get("eta") if row["objective"] == "mixce" else (1.0 if row["objective"] == "mle" else None)
        if row["objective"] == "dft":  # DFT is MixCE with η = 0 (docs/objectives.md): the same optimum
            eta = 0.0
        row["theory_js"] = _mean_std(np.array([theory_js(vocab, r["seed"], eta) for r in ok])) if eta is not None \
            else (math.nan, math.nan)
        row["seconds"] = float(np.mean([r["seconds"] for r in recs])) if recs else 0.0
        row["errors"] = sorted({r["error"] for r in recs if r.get("error")})
        rows.append(row)
    return rows


def _mean_std(vals: np.ndarray) -> tuple[float, float]:
    if len(vals) == 0:
        return (math.nan, math.nan)
    return (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)


def _fmt(ms: tuple[float, float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "–"
    if math.isinf(mean):
        return "∞"
    return f"{round(mean * scale, digits) + 0.0:.{digits}f} ± {std * scale:.{digits}f}"  # + 0.0: no "-0.00"


def results_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: one table per (family, vocabulary size), mean ± std over seeds."""
    cfg = results["config"]
    rows = summarise(results)
    eos = "an ordinary Dirichlet column" if cfg["eos_prob"] is None else f"probability {cfg['eos_prob']}"
    lines = [
        "# Known-P lab results",
        "",
        (f"Seeds {list(cfg['seeds'])}; {cfg['num_train']} training sequences of at most {cfg['max_length']} tokens; "
        f"rows ~ Dirichlet({cfg['alpha']}) with {cfg['zero_fraction']:.0%} of entries zeroed; "
        f"EOS {eos}."),
        ("Mean ± std over seeds (each seed a new language and a new initialisation). JS, JS−MLE (paired, same "
        "language) and forward/reverse KL in 10⁻³ nats; mass on impossible transitions in %. "
        "RKLε = reverse KL with P clipped at 1e-6 (exact reverse KL is infinite for any softmax model). "
        "JS of the objective's optimum: where MixCE(η) drives a free row (a sharpened P, see "
        "metrics.mixce_fixed_point), i.e. the floor of its JS with unlimited data and training. "
        "bigram: exact over all rows; gpt2: on held-out sequences of the true chain."),
        "",
    ]
    for family, fam in cfg["families"].items():
        lines.append(f"## {family} (steps {fam['steps']}, batch {fam['batch_size']} sequences, lr {fam['lr']})")
        lines.append("")
        for vocab in fam["vocab_sizes"]:
            sub = [r for r in rows if r["family"] == family and r["vocab_size"] == vocab]
            if not sub:
                continue
            lines += [f"### V = {vocab}", "",
                      ("| objective | JS (10⁻³) | JS − MLE (10⁻³) | JS of the objective's optimum (10⁻³) | FKL (10⁻³) "
                       "| RKLε (10⁻³) | RKL on support (10⁻³) | impossible mass (%) | runs | s/run |"),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in sub:
                runs = f"{r['n']} ({r['failed']} failed)" if r["failed"] else str(r["n"])
                lines.append(
                    f"| {r['label']} | {_fmt(r['js'], 1e3)} | {_fmt(r['js_minus_mle'], 1e3)} "
                    f"| {_fmt(r['theory_js'], 1e3)} | {_fmt(r['fkl'], 1e3)} "
                    f"| {_fmt(r['rkl'], 1e3)} | {_fmt(r['rkl_support'], 1e3)} | {_fmt(r['impossible_mass'], 100)} "
                    f"| {runs} | {r['seconds']:.1f} |"
                )
            lines.append("")
            for r in sub:
                for err in r["errors"]:
                    lines.append(f"- {r['label']} failed: `{err}`")
            if any(r["errors"] for r in sub):
                lines.append("")
    if results.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """JS vs MixCE η per (family, V), with the other objectives as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(results)
    panels = [(f, v) for f, fam in results["config"]["families"].items() for v in fam["vocab_sizes"]
              if any(r["family"] == f and r["vocab_size"] == v for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = list(dict.fromkeys(r["label"] for r in rows if r["objective"] not in ("mixce", "mle")))
    color = {label: palette[i % len(palette)] for i, label in enumerate(others)}  # same colour in every panel
    for ax, (family, vocab) in zip(axes[0], panels):
        sub = [r for r in rows if r["family"] == family and r["vocab_size"] == vocab and r["n"]]
        mix = sorted(((r["options"]["eta"], r) for r in sub if r["objective"] == "mixce"), key=lambda t: t[0])
        mix += [(1.0, r) for r in sub if r["objective"] == "mle"]
        if mix:
            xs = np.arange(len(mix))
            ax.errorbar(xs, [r["js"][0] for _, r in mix], yerr=[r["js"][1] for _, r in mix], marker="o",
                        color="black", capsize=3, label="MixCE (η=1 is MLE)")
            ax.set_xticks(xs, [f"{eta:g}" for eta, _ in mix])
            mle = [r for r in sub if r["objective"] == "mle"]
            if mle:  # prediction: MLE's (finite-training) error + the JS of MixCE(η)'s own optimum
                ax.plot(xs, [mle[0]["js"][0] + r["theory_js"][0] for _, r in mix], linestyle=":", marker="x",
                        color="gray", label="MLE + JS of the η optimum (theory)")
        for r in sub:
            if r["objective"] in ("mixce", "mle"):
                continue
            ax.axhline(r["js"][0], linestyle="--" if r["objective"] else ":", color=color[r["label"]], label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("MixCE η")
        ax.set_ylabel("average per-row JS (nats)")
        ax.set_title(f"{family}, V = {vocab}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
