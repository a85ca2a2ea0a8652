"""``scripts/compare.py``: compare runs: eval curves side by side (PNG) and a Markdown table of final numbers.

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

Rows are labelled uniquely: the directory name (or, for a scripts/evaluate.py JSON, the checkpoint
path it records), lengthened with the parent directories, or suffixed with the JSON file, where two
would read the same. The objective of a JSON row is the ``objective`` evaluate.py recorded (else
the run config next to the checkpoint path, if it is still there). Rows evaluated on different data
(different human references, or different ``eval_data_sha256`` in evaluate.py JSONs) get a
``data`` column (A, B, ...), one human row per data set and a warning: their numbers are not
comparable across data sets.

Bad input (a missing run, a directory without logs, a JSON that is not an evaluate.py result,
wrong ``--labels``) gives one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import UserError
from ..runs import find_trainer_state, read_run_config

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


class CompareError(UserError):
    """Bad input: reported as one line ``error: ...``, exit code 2."""


def find_state(run: Path) -> Path:
    if not run.exists():
        raise CompareError(f"{run}: no such run directory (or evaluate.py JSON file)")
    state = find_trainer_state(run)
    if state is None:
        raise CompareError(f"{run}: no trainer_state.json (nor checkpoint-*/trainer_state.json); is it a run directory?")
    return state


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


def _run_config(run: Path) -> dict:
    return read_run_config(run)


def objective_of(run: Path) -> str:
    raw = _run_config(run)
    if not raw:
        return "?"
    obj = raw.get("objective") or {}
    return str(obj.get("name", "?")) if isinstance(obj, dict) else str(obj)


def _data_of_run(run: Path) -> str:
    """Words for the eval data of a run, from its saved config."""
    data = _run_config(run).get("data") or {}
    if not isinstance(data, dict):
        return f"eval split of {run}"
    what = data.get("validation_files") or data.get("dataset") or data.get("train_files")
    return f"eval split of {run}" + (f" ({what})" if what else "")


def read_run(path: Path) -> dict:
    state = json.loads(find_state(path).read_text())
    events = eval_events(state.get("log_history", []))
    if not events:
        raise CompareError(f"{path}: no evaluation in its log history (was eval_strategy set?)")
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
            "objective": objective_of(path), "source": path, "data_id": None, "data": _data_of_run(path)}


def read_results_json(path: Path) -> list[tuple[str, dict]]:
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: not valid JSON ({e}); expected a scripts/evaluate.py result") from None
    if not isinstance(res, dict) or not isinstance(res.get("checkpoints"), dict):
        raise CompareError(f"{path}: no 'checkpoints' in it; expected a scripts/evaluate.py result")
    protocol = res.get("protocol") or {}
    source = protocol.get("eval_source")
    if isinstance(source, list):
        source = ", ".join(map(str, source))
    data = f"{source or 'unknown eval data'} (evaluated in {path})"
    data_id = protocol.get("eval_data_sha256")
    runs = []
    ref = {f"eval_{k}": v for k, v in (res.get("reference") or {}).items()}
    for name, r in res["checkpoints"].items():
        final = {f"eval_{k}": v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        objective = r.get("objective") or objective_of(Path(name))  # older JSONs: the run config, if still there
        runs.append((name, {"curve": [], "final": final, "reference": ref, "objective": objective, "source": path,
                            "data_id": data_id, "data": data}))
    return runs


# --------------------------------------------------------------------------- labels and data sets


def unique_labels(runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Make the row labels unique: a run directory's name grows into its parent directories
    (``a/mle``, ``b/mle``); a JSON row gets the JSON file appended (``runs/mle/final [r1.json]``);
    what is still the same (the same path given twice) is numbered."""
    labels = [name for name, _ in runs]
    for name in sorted({n for n in labels if labels.count(n) > 1}):
        idx = [i for i, n in enumerate(labels) if n == name]
        parts = [Path(runs[i][1].get("source") or name).parts for i in idx]
        suffixes = None
        for k in range(1, max(len(p) for p in parts) + 1):
            cand = ["/".join(p[-k:]) for p in parts]
            if len(set(cand)) == len(cand):
                suffixes = cand
                break
        for j, i in enumerate(idx):
            if suffixes is None:
                labels[i] = f"{name} #{j + 1}"
            elif runs[i][1].get("source") is not None and Path(runs[i][1]["source"]).suffix == ".json":
                labels[i] = f"{name} [{suffixes[j]}]"
            else:
                labels[i] = suffixes[j] if suffixes[j] != name else f"{name} #{j + 1}"
    seen: dict[str, int] = {}
    for i, n in enumerate(labels):  # anything a lengthened label collides with
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            labels[i] = f"{n} #{seen[n]}"
    return [(label, r) for label, (_, r) in zip(labels, runs)]


def data_sets(runs: list[tuple[str, dict]]) -> list[dict]:
    """Group the rows by the data they were evaluated on; sets ``r["data_set"]`` (an index) on each row.

    Two rows share a data set when their human references are equal and, where both are known,
    their ``eval_data_sha256`` too. Returns one dict per set: ``reference``, ``data`` (words), ``rows``.
    """
    sets: list[dict] = []
    for name, r in runs:
        ref_key = tuple(sorted((k, round(v, 10) if isinstance(v, float) else v) for k, v in r["reference"].items()))
        for i, s in enumerate(sets):
            if s["ref_key"] == ref_key and (s["data_id"] is None or r["data_id"] is None or s["data_id"] == r["data_id"]):
                s["data_id"] = s["data_id"] or r["data_id"]
                break
        else:
            sets.append({"ref_key": ref_key, "data_id": r["data_id"], "reference": r["reference"], "data": r["data"],
                         "rows": []})
            i = len(sets) - 1
        if not sets[i]["reference"] and r["reference"]:
            sets[i]["reference"] = r["reference"]
        sets[i]["rows"].append(name)
        r["data_set"] = i
    return sets


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"D{i + 1}"


# --------------------------------------------------------------------------- outputs


def _fmt(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return f"{text} ± {std:.2g}" if std is not None else text


def markdown_table(runs: list[tuple[str, dict]]) -> str:
    sets = data_sets(runs)
    several = len(sets) > 1
    data_col = " data |" if several else ""
    head = "| run | objective |" + data_col + " step | " + " | ".join(t for _, t in TABLE) + " |"
    lines = [head, "|" + "---|" * (3 + several + len(TABLE))]
    for name, r in runs:
        f = r["final"]
        cells = [_fmt(f.get(k), f.get(f"{k}_std")) for k, _ in TABLE]
        data = f" {_letter(r['data_set'])} |" if several else ""
        lines.append(f"| {name} | {r['objective']} |{data} {f.get('step', '–')} | " + " | ".join(cells) + " |")
    for i, s in enumerate(sets):
        ref = s["reference"]
        if ref:
            cells = [_fmt(ref.get(k.replace("eval_", "eval_ref_", 1))) for k, _ in TABLE]
            label, data = (f"human (reference continuations, data {_letter(i)})", f" {_letter(i)} |") if several \
                else ("human (reference continuations)", "")
            lines.append(f"| {label} | – |{data} – | " + " | ".join(cells) + " |")
    notes = []
    if several:
        notes.append(f"Evaluated on {len(sets)} different data sets: "
                     + "; ".join(f"{_letter(i)} = {s['data']}" for i, s in enumerate(sets))
                     + ". Compare rows within one data set only.")
    ns = sorted({int(r["final"]["eval_mauve_num_samples"]) for _, r in runs if "eval_mauve_num_samples" in r["final"]})
    if ns:
        text = " / ".join(map(str, ns))
        notes.append(f"MAUVE on {text} samples per side" + (" (under 500: noisy, biased upward)." if ns[0] < 500 else "."))
    for note in notes:
        lines.append("")
        lines.append(note)
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
            sets = data_sets(runs)
            refs = [(i, s["reference"].get("eval_ref_diversity")) for i, s in enumerate(sets) if s["reference"]]
            styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
            for j, (i, ref) in enumerate(r for r in refs if r[1] is not None):
                name = "human" if len(sets) == 1 else f"human (data {_letter(i)})"
                ax.axhline(ref, color="black", linestyle=styles[j % len(styles)], linewidth=1, label=name)
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
    try:
        return _compare(args)
    except CompareError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _compare(args) -> int:
    runs: list[tuple[str, dict]] = []
    for item in args.runs:
        path = Path(item)
        if path.suffix == ".json" and not path.is_dir():
            if not path.is_file():
                raise CompareError(f"{path}: no such file")
            runs.extend(read_results_json(path))
        else:
            runs.append((path.resolve().name if path.name in ("", ".", "..") else path.name, read_run(path)))
    if args.labels:
        if len(args.labels) != len(runs):
            raise CompareError(f"--labels: {len(args.labels)} labels for {len(runs)} rows "
                               f"({', '.join(name for name, _ in runs)})")
        dupes = sorted({x for x in args.labels if args.labels.count(x) > 1})
        if dupes:
            raise CompareError(f"--labels: {', '.join(dupes)} given twice; every row needs its own label")
        runs = [(label, r) for label, (_, r) in zip(args.labels, runs)]
    else:
        runs = unique_labels(runs)
    sets = data_sets(runs)
    if len(sets) > 1:
        print(f"warning: the rows were evaluated on {len(sets)} different data sets ("
              + "; ".join(f"{_letter(i)}: {', '.join(s['rows'])}" for i, s in enumerate(sets))
              + "): compare numbers within a data set only", file=sys.stderr)
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

