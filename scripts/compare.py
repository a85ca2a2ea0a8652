#!/usr/bin/env python
"""Compare runs: eval curves side by side (PNG) and a Markdown table of final numbers.

    python scripts/compare.py runs/mle runs/emo runs/mixce --output-dir runs/compare
    python scripts/compare.py runs/*/ --labels MLE EMO MixCE --output-dir cmp
    python scripts/compare.py results.json --output-dir cmp        # a scripts/evaluate.py JSON: table only

A run is an output directory: its ``trainer_state.json`` (written at the end of training) or,
failing that, the one of its latest ``checkpoint-*``; the objective is read from the run's
``emo_trainer_config.yaml`` when there is one. The eval entries of ``log_history`` are merged per
evaluation (the trainer's ``eval_loss`` entry and the generation-metrics entry of the same step).

Writes ``compare.png`` (eval loss, perplexity, MAUVE and diversity against the training step, one
line per run, ± std bands when several sampling seeds were used, the human diversity as a dashed
line) and ``compare.md`` (one row per run at its last evaluation, plus the human reference row),
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANELS = [("eval_loss", "eval loss (CE)", False), ("eval_perplexity", "perplexity", True),
          ("eval_mauve", "MAUVE (higher = closer to human)", False),
          ("eval_diversity", "diversity (human = dashed)", False)]
TABLE = [("eval_loss", "eval loss"), ("eval_perplexity", "perplexity"), ("eval_mauve", "MAUVE"),
         ("eval_diversity", "diversity"), ("eval_rep_2", "rep-2"), ("eval_rep_4", "rep-4"),
         ("eval_seq_rep_4", "seq-rep-4"), ("eval_distinct_2", "distinct-2"), ("eval_mean_length", "length")]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plot eval curves of several runs and tabulate their final numbers.")
    p.add_argument("runs", nargs="+", help="run output directories (or scripts/evaluate.py JSON files)")
    p.add_argument("--labels", nargs="+", help="a name per run (default: directory names)")
    p.add_argument("--output-dir", default=".", help="where compare.png and compare.md go")
    p.add_argument("--title", default=None, help="figure title")
    return p


# --------------------------------------------------------------------------- reading runs


def find_state(run: Path) -> Path:
    if (run / "trainer_state.json").is_file():
        return run / "trainer_state.json"
    ckpts = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if not ckpts:
        raise SystemExit(f"{run}: no trainer_state.json (nor checkpoint-*/trainer_state.json); is it a run directory?")
    return ckpts[-1]


def eval_events(log_history: list[dict]) -> list[dict]:
    """One dict per evaluation: entries of the same step with disjoint ``eval_*`` keys are merged."""
    events: list[dict] = []
    for entry in log_history:
        keys = {k for k in entry if k.startswith("eval_")}
        if not keys:
            continue
        last = events[-1] if events else None
        if last is not None and last["step"] == entry.get("step") and not (keys & set(last)):
            last.update({k: entry[k] for k in keys})
        else:
            events.append({"step": entry.get("step"), **{k: entry[k] for k in keys}})
    return events


def objective_of(run: Path) -> str:
    for d in (run, run.parent):
        cfg = d / "emo_trainer_config.yaml"
        if cfg.is_file():
            import yaml

            raw = yaml.safe_load(cfg.read_text()) or {}
            return str((raw.get("objective") or {}).get("name", "?"))
    return "?"


def read_run(path: Path) -> dict:
    state = json.loads(find_state(path).read_text())
    events = eval_events(state.get("log_history", []))
    if not events:
        raise SystemExit(f"{path}: no evaluation in its log history (was eval_strategy set?)")
    curve: dict[int, dict] = {}
    for e in events:  # the first evaluation at a step is the training-time one
        curve.setdefault(e["step"], e)
    final: dict = {}
    for e in events:  # the latest value of every key (the final evaluate() wins), with its own std only
        for k, v in e.items():
            final[k] = v
            if not k.endswith("_std") and f"{k}_std" not in e:
                final.pop(f"{k}_std", None)
    reference = {k: v for e in events for k, v in e.items() if k.startswith("eval_ref_")}
    return {"curve": [curve[s] for s in sorted(curve)], "final": final, "reference": reference,
            "objective": objective_of(path)}


def read_results_json(path: Path) -> list[tuple[str, dict]]:
    res = json.loads(path.read_text())
    runs = []
    ref = {f"eval_{k}": v for k, v in res.get("reference", {}).items()}
    for name, r in res.get("checkpoints", {}).items():
        final = {f"eval_{k}": v for k, v in r.items() if isinstance(v, (int, float))}
        runs.append((name, {"curve": [], "final": final, "reference": ref, "objective": "?"}))
    return runs


# --------------------------------------------------------------------------- outputs


def _fmt(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return f"{text} ± {std:.2g}" if std is not None else text


def markdown_table(runs: list[tuple[str, dict]]) -> str:
    head = "| run | objective | step | " + " | ".join(t for _, t in TABLE) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE))]
    for name, r in runs:
        f = r["final"]
        cells = [_fmt(f.get(k), f.get(f"{k}_std")) for k, _ in TABLE]
        lines.append(f"| {name} | {r['objective']} | {f.get('step', '–')} | " + " | ".join(cells) + " |")
    ref = next((r["reference"] for _, r in runs if r["reference"]), None)
    if ref:
        cells = [_fmt(ref.get(k.replace("eval_", "eval_ref_", 1))) for k, _ in TABLE]
        lines.append("| human (reference continuations) | – | – | " + " | ".join(cells) + " |")
    n = next((r["final"].get("eval_mauve_num_samples") for _, r in runs if "eval_mauve_num_samples" in r["final"]),
             None)
    if n is not None:
        lines.append("")
        lines.append(f"MAUVE on {int(n)} samples per side" + (" (under 500: noisy, biased upward)." if n < 500 else "."))
    return "\n".join(lines) + "\n"


def plot(runs: list[tuple[str, dict]], path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, log) in zip(axes, PANELS):
        drawn = False
        for i, (name, r) in enumerate(runs):
            pts = [(e["step"], e[key], e.get(f"{key}_std")) for e in r["curve"] if key in e]
            if not pts:
                continue
            steps, values, stds = zip(*pts)
            color = colors[i % len(colors)]
            ax.plot(steps, values, marker="o", ms=3.5, color=color, label=name)
            if all(s is not None for s in stds):
                lo = [v - s for v, s in zip(values, stds)]
                hi = [v + s for v, s in zip(values, stds)]
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn = True
        if key == "eval_diversity":
            ref = next((r["reference"].get("eval_ref_diversity") for _, r in runs if r["reference"]), None)
            if ref is not None:
                ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="human")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if log and drawn:
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 3, 5)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes[:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    runs: list[tuple[str, dict]] = []
    for i, item in enumerate(args.runs):
        path = Path(item)
        if path.is_file() and path.suffix == ".json":
            runs.extend(read_results_json(path))
        else:
            runs.append((path.name or str(path), read_run(path)))
    if args.labels:
        if len(args.labels) != len(runs):
            raise SystemExit(f"--labels: {len(args.labels)} labels for {len(runs)} runs")
        runs = [(label, r) for label, (_, r) in zip(args.labels, runs)]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "compare.md").write_text(table)
    print(table)
    if any(r["curve"] for _, r in runs):
        plot(runs, out / "compare.png", args.title)
        print(f"[compare] wrote {out / 'compare.png'} and {out / 'compare.md'}")
    else:
        print(f"[compare] wrote {out / 'compare.md'} (no curves to plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
