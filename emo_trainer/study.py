"""The calibration study: one pretrained checkpoint, calibrated with every objective, evaluated alike.

    python scripts/calibration_study.py --output-dir runs/study --model /path/to/checkpoint \
        --train-file /path/to/wiki.train.tokens --valid-file /path/to/wiki.valid.raw \
        --test-file /path/to/wiki.test.raw                                   # every default row, full scale
    ... --objectives none mle emo-m1=emo:emo.mode=1 --stage calibrate       # rows, and one stage at a time
    ... --stage probe --objectives mle emo-m2=emo:emo.mode=2                # the first-steps gradient probe

Stages: ``calibrate`` (train only), ``evaluate`` (only rows already trained; ``--no-mauve`` leaves
MAUVE for ``score``, e.g. on a machine without mauve-text), ``score``, ``probe``
(:func:`gradient_probe`), ``all`` (default: calibrate and evaluate).

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
   ``train_loss.png``, and runs ``emo_trainer.evaluation.compare`` on ``results.json`` (``compare.md``).

Every model's results go to ``<output-dir>/<name>/eval.json`` and its samples to
``<name>/samples.jsonl``, one *unit* (decoding setting, sampling seed) at a time, so re-running a
command resumes the study where it stopped, and nothing current is recomputed: adding a seed
(``--seeds 0 1 2`` after ``--seeds 0``) or a decoding setting samples only the new units; changing
the featurizer re-scores MAUVE from the kept samples; other ``--objectives`` may be added.
The calibration settings are kept in ``study_settings.json``; re-running with different ones
stops with an error instead of mixing models made differently.
``--jobs N`` runs N models at a time (``--threads`` torch threads each).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger(__name__)

LABELS = {"none": "no calibration", "mle": "MLE", "emo": "EMO", "mixce": "MixCE", "mile": "MiLe",
          "sequencematch": "SequenceMatch", "dft": "DFT", "tailr": "TaiLr", "focal": "focal", "eaft": "EAFT",
          "emo-m1": "EMO mode 1 (cap 3)", "emo-m2": "EMO mode 2", "emo-m1-uncapped": "EMO mode 1 (uncapped)",
          "emo-m1-live": "EMO mode 1 (cap 3), live cost"}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate one checkpoint with each objective and evaluate all alike.")
    default_config = REPO / "configs/calibrate_emo.yaml"
    p.add_argument("--config", default=str(default_config) if default_config.is_file() else None,
                   required=not default_config.is_file(),
                   help="base calibration config (default: the repository's configs/calibrate_emo.yaml)")
    p.add_argument("--model", required=True, help="the pretrained checkpoint to calibrate (a local directory)")
    p.add_argument("--train-file", required=True,
                   help="calibration documents, one per line (e.g. WikiText-2's wiki.train.tokens)")
    p.add_argument("--valid-file", required=True,
                   help="validation documents (end-of-training eval loss only; e.g. wiki.valid.raw)")
    p.add_argument("--test-file", required=True, help="test documents (e.g. wiki.test.raw)")
    p.add_argument("--detokenize", default="wikitext", help="data.detokenize for the calibration text ('none' = off)")
    p.add_argument("--no-detokenize-test", action="store_true", help="evaluate on the test text exactly as in the file")
    p.add_argument("--objectives", nargs="+",
                   default=["none", "mle", "emo-m1=emo:emo.mode=1,emo.ratio_cap=3", "emo-m2=emo:emo.mode=2", "mixce", "mile",
                            "sequencematch", "dft", "tailr", "focal", "eaft"],
                   help="rows of the study: 'none' = the uncalibrated checkpoint; else [NAME=]OBJECTIVE[:KEY=VALUE,...] "
                        "with config overrides for that row only, e.g. emo-m1=emo:emo.mode=1 "
                        "mle-lr2e-5=mle:training.learning_rate=2e-5")
    p.add_argument("--stage", choices=["all", "calibrate", "evaluate", "score", "probe"], default="all",
                   help="calibrate = train the models only (evaluate later); evaluate = only models already trained; "
                        "score = MAUVE of the samples that an evaluation with --no-mauve left; probe = how each "
                        "row's objective moves the base model's held-out CE in its first AdamW steps (probe.json)")
    p.add_argument("--probe-steps", type=int, default=10, help="AdamW steps per objective of --stage probe")
    p.add_argument("--probe-batch-size", type=int, default=16, help="blocks per step of --stage probe")
    p.add_argument("--no-mauve", action="store_true",
                   help="evaluate without MAUVE (perplexity, samples, repetition); add it later with --stage score, "
                        "e.g. on another machine that has mauve-text")
    p.add_argument("--output-dir", required=True, help="the study directory (resumable; one study per directory)")
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
    p.add_argument("--num-prompts", type=int, default=None,
                   help="the first N test documents with --prompt-words + --continuation-words words (default: all)")
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--continuation-words", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--decodings", nargs="*", default=["top_p=0.95"], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="decoding settings besides pure sampling, each logged under its name (eval.decodings); "
                        "default: top_p=0.95; none: --decodings with no value")
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


@functools.lru_cache(maxsize=2)
def _read_test_documents(test_file: str, detokenize: bool) -> tuple[str, ...]:
    from emo_trainer.data import detokenize_wikitext

    lines = Path(test_file).read_text(encoding="utf-8").splitlines()
    if detokenize:
        lines = [detokenize_wikitext(x) for x in lines]
    return tuple(x for x in lines if x.strip())


def test_documents(args) -> list[str]:
    """The test documents, detokenized like the calibration text unless ``--no-detokenize-test`` (read once)."""
    return list(_read_test_documents(args.test_file, args.detokenize != "none" and not args.no_detokenize_test))


def eval_config(args):
    from emo_trainer.evaluation.config import EvalConfig, parse_decoding

    return EvalConfig(
        num_prompts=len(prompts_of(args)), prompt_words=args.prompt_words, continuation_words=args.continuation_words,
        max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, seeds=tuple(args.seeds),
        mauve_featurizer=args.featurizer or args.model, mauve_kmeans_num_redo=args.mauve_kmeans_num_redo,
        mauve=not getattr(args, "no_mauve", False) or args.stage == "score",
        mauve_device="cpu" if not _cuda() else "auto", decodings=tuple(parse_decoding(d) for d in args.decodings),
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prompts_of(args):
    """The evaluation prompts: every test document with enough words (or the first ``--num-prompts``)."""
    from emo_trainer.evaluation.prompts import build_prompts

    return build_prompts(test_documents(args), args.prompt_words, args.continuation_words, args.num_prompts)


def featurizer_of(args):
    from emo_trainer.evaluation.metrics.mauve import get_featurizer

    c = eval_config(args)
    return get_featurizer(c.mauve_featurizer, c.mauve_max_text_length, c.featurizer_batch_size, c.mauve_pooling,
                          c.mauve_device)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the study: a name (its directory and label), an objective, and the config
    overrides of this row only (``[NAME=]OBJECTIVE[:KEY=VALUE,...]``)."""

    name: str
    objective: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The row's name in tables: ``LABELS``, and a learning-rate or training-seed variant of a
        labelled row (``emo-m1-lr1e-4``, ``mle-seed43``) as that label with its setting
        (``EMO mode 1 (cap 3), lr 1e-4``, ``MLE, training seed 43``)."""
        if self.name in LABELS:
            return LABELS[self.name]
        for suffix, words in (("-lr", "lr"), ("-seed", "training seed")):
            base, sep, value = self.name.rpartition(suffix)
            if sep and base in LABELS and value:
                return f"{LABELS[base]}, {words} {value}"
        return self.name


def parse_row(spec: str) -> Row:
    """``emo`` → Row('emo', 'emo'); ``emo-m1=emo:emo.mode=1,emo.ratio_cap=3`` → a named variant.

    A variant without a name is named after its overrides (``emo:emo.mode=1`` → ``emo_emo.mode-1``)."""
    head, _, tail = spec.partition(":")
    name, eq, objective = head.partition("=")
    if not eq:
        name, objective = "", head
    objective = objective.strip()
    overrides = tuple(x.strip() for x in tail.split(",") if x.strip()) if tail else ()
    if not objective or any("=" not in o for o in overrides):
        raise ValueError(f"--objectives {spec!r}: write [NAME=]OBJECTIVE[:KEY=VALUE,...], "
                         "e.g. emo-m1=emo:emo.mode=1")
    if not name:
        name = objective + "".join("_" + o.replace("=", "-") for o in overrides)
    if any(c in name for c in "/\\ ") or name.startswith("."):
        raise ValueError(f"--objectives {spec!r}: the row name {name!r} must be usable as a directory name")
    if objective == "none" and overrides:
        raise ValueError(f"--objectives {spec!r}: 'none' (the uncalibrated checkpoint) takes no overrides")
    return Row(name, objective, overrides)


def rows_of(args) -> list[Row]:
    rows = [parse_row(s) for s in args.objectives]
    seen: dict[str, str] = {}
    for r, spec in zip(rows, args.objectives):
        if r.name in seen:
            raise ValueError(f"--objectives: {seen[r.name]!r} and {spec!r} both name the row {r.name!r}; give one NAME=")
        seen[r.name] = spec
    return rows


def calibration_overrides(args, row: Row, out: Path) -> list[str]:
    """The overrides of one calibration run: identical for every row except objective.name and
    the row's own overrides (applied last)."""
    calib = out / "calibration_set.txt"
    return [
        f"--objective={row.objective}",
        f"--model.name_or_path={args.model}",
        "--data.dataset=null",
        f"--data.train_files=[{calib}]",       # the shared calibration set, one sentence per line
        f"--data.validation_files=[{validation_file(args, out)}]",
        "--data.calibration_sentences=null",    # already sampled (step 1)
        "--data.detokenize=null",               # the set is already detokenized (not idempotent)
        "--data.max_eval_samples=50",           # end-of-training eval loss on a few documents only
        f"--data.block_size={args.block_size}",
        "--eval.generation=false",              # evaluated below, identically for every model
        f"--training.output_dir={out / row.name}",
        f"--training.learning_rate={args.learning_rate}",
        f"--training.per_device_train_batch_size={args.batch_size}",
        f"--training.per_device_eval_batch_size={args.batch_size}",
        f"--training.seed={args.seed}",
        "--training.report_to=none",
        *[s if s.startswith("--") else f"--{s}" for s in args.set],
        *[f"--{o}" for o in row.overrides],
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

    from emo_trainer.evaluation.metrics.mauve import featurize

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


#: The evaluation arguments that change a model's perplexity.
_PPL_ARGS = ("test_file", "no_detokenize_test", "ppl_blocks")
#: ... that change every sample.  A model's samples come in *units*, one per (decoding setting,
#: seed): a unit made with these settings is kept when seeds or decoding settings are added.
_GEN_ARGS = ("test_file", "no_detokenize_test", "num_prompts", "prompt_words", "continuation_words",
             "max_new_tokens", "gen_batch_size")
#: ... that change MAUVE only: a unit's samples are kept and scored again.
_MAUVE_ARGS = ("featurizer", "mauve_kmeans_num_redo")
#: The calibration's own keys of an ``eval.json`` (everything else is the evaluation's).
_CALIBRATION_KEYS = ("objective", "label", "overrides", "model_dir", "train_metrics", "train_runtime",
                     "resumed_from_step")


def _pick(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}


def unit_key(decoding, seed: int) -> str:
    """The name of one unit of samples: ``pure/seed0``, ``top_p0.95/seed2`` (its samples.jsonl column)."""
    return f"{decoding.name or 'pure'}/seed{seed}"


def _units_wanted(args) -> list[tuple[str, dict, object, int]]:
    """(key, generation settings, decoding, seed) of every unit the current arguments ask for."""
    out = []
    decodings = eval_config(args).decoding_settings()
    for seed in args.seeds:
        for d in decodings:
            settings = {**_pick(args, _GEN_ARGS), "decoding": dataclasses.asdict(d), "seed": seed}
            out.append((unit_key(d, seed), settings, d, seed))
    return out


def _legacy_units(info: dict) -> dict:
    """An ``eval.json`` written before units existed (one ``per_seed`` list for its ``eval_settings``)
    → the same results as units, so an older study directory resumes without evaluating again."""
    from types import SimpleNamespace

    es = info["eval_settings"]
    from emo_trainer.evaluation.config import EvalConfig, parse_decoding

    ns = SimpleNamespace(**{k: es.get(k) for k in (*_GEN_ARGS, *_MAUVE_ARGS, *_PPL_ARGS)})

    decodings = EvalConfig(decodings=tuple(parse_decoding(d) for d in es["decodings"])).decoding_settings()
    named = [d for d in decodings if d.name]
    # the older layout timed the whole generation only: each unit gets an equal share of it
    share = info.get("generation_runtime", 0.0) / max(1, len(es["seeds"]) * len(decodings))
    units = {}
    for seed, metrics in zip(es["seeds"], info["per_seed"]):
        for d in decodings:
            if d.name:
                m = {k[len(d.name) + 1:]: v for k, v in metrics.items() if k.startswith(d.name + "_")}
            else:
                m = {k: v for k, v in metrics.items() if not any(k.startswith(o.name + "_") for o in named)}
            pending = bool(info.get("mauve_pending"))
            units[unit_key(d, seed)] = {
                "settings": {**_pick(ns, _GEN_ARGS), "decoding": dataclasses.asdict(d), "seed": seed},
                "mauve_settings": None if pending else _pick(ns, _MAUVE_ARGS), "metrics": m,
                "runtime": round(share, 1)}
    ppl = {k: info[k] for k in ("perplexity", "nll", "ppl_tokens", "ppl_blocks", "perplexity_runtime") if k in info}
    if ppl:
        ppl["settings"] = _pick(ns, _PPL_ARGS)
    return {"units": units, "ppl": ppl or None}


def load_evaluation(path: Path) -> dict:
    """A model's ``eval.json`` with its ``units`` and ``ppl`` (converted from the older layout,
    which ``legacy_layout`` then marks)."""
    info = json.loads(path.read_text())
    if "units" not in info:
        info["legacy_layout"] = True
        info.update(_legacy_units(info) if "per_seed" in info and "eval_settings" in info else {"units": {}, "ppl": None})
    return info


def _texts_current(args, info: dict) -> tuple[bool, list, list]:
    """Whether the perplexity is current, the wanted units whose samples are missing or stale, and
    those whose MAUVE is missing or stale (samples current)."""
    ppl_ok = bool(info.get("ppl")) and info["ppl"].get("settings") == _pick(args, _PPL_ARGS)
    to_sample, to_score = [], []
    mauve_settings = _pick(args, _MAUVE_ARGS)
    for key, settings, d, seed in _units_wanted(args):
        unit = info["units"].get(key)
        if unit is None or unit["settings"] != settings:
            to_sample.append((key, settings, d, seed))
        elif unit.get("mauve_settings") != mauve_settings:
            to_score.append((key, settings, d, seed))
    return ppl_ok, to_sample, to_score


def evaluation_view(args, info: dict, partial: bool = False) -> dict | None:
    """The results the current arguments ask for, from a model's units: perplexity, ``per_seed``
    (every decoding setting's keys under its name, ``seeds`` naming their seeds), their mean/std
    over seeds, and ``seeds_by_decoding``; ``mauve_pending`` where some unit has no current MAUVE.

    None while a unit or the perplexity is missing — unless ``partial``: then the units that are
    there (every mean over the seeds that have it; None only without perplexity or any unit), for
    a report of a study still under way."""
    from emo_trainer.evaluation.callback import aggregate_seeds

    ppl_ok, to_sample, to_score = _texts_current(args, info)
    if not ppl_ok or (to_sample and not partial):
        return None
    pending = bool(to_score)
    missing = {key for key, *_ in to_sample}
    per_seed, seeds, by_decoding = [], [], {}
    runtime = 0.0
    decodings = eval_config(args).decoding_settings()
    for seed in args.seeds:
        merged = {}
        for d in decodings:
            key = unit_key(d, seed)
            if key in missing:
                continue
            unit = info["units"][key]
            runtime += unit.get("runtime", 0.0)
            merged.update({d.key(k): v for k, v in unit["metrics"].items()
                           if not (pending and k.startswith("mauve"))})
            by_decoding.setdefault(d.name, []).append(seed)
        if merged:
            per_seed.append(merged)
            seeds.append(seed)
    if not per_seed:
        return None
    view = {k: v for k, v in info["ppl"].items() if k != "settings"}
    view.update(aggregate_seeds(per_seed))
    view["per_seed"] = per_seed
    view["seeds"] = seeds
    view["seeds_by_decoding"] = by_decoding
    view["generation_runtime"] = round(runtime, 1)
    view["eval_settings"] = evaluation_settings(args)
    if pending:
        view["mauve_pending"] = True
    if missing:
        view["incomplete"] = sorted(missing)
    return view


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # a run killed while writing leaves the previous file whole


def _read_samples(path: Path, prompts) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    if [r.get("prefix") for r in rows] != [p.prefix for p in prompts]:
        return [{"prefix": p.prefix, "reference": p.reference} for p in prompts]
    return rows


def _write_samples(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    tmp.replace(path)


def evaluate_model(args, name: str, info: dict, out: Path) -> dict:
    """Bring one model's evaluation up to the current arguments, unit by unit, through the
    evaluation callback's own code (:class:`~emo_trainer.evaluation.GenerationEvalCallback`):
    perplexity if stale; the samples of each missing (decoding setting, seed) unit, with their
    repetition metrics and, unless ``--no-mauve``, MAUVE; MAUVE of current samples whose MAUVE is
    missing or stale (``--stage score`` does only this).  ``eval.json`` and ``samples.jsonl``
    (one column per unit) are written after every unit, so an interrupted evaluation resumes
    where it stopped.  Returns the updated info."""
    import numpy as np

    from emo_trainer.evaluation.callback import GenerationEvalCallback
    from emo_trainer.evaluation.checkpoints import document_perplexity, is_sequencematch_checkpoint, load_checkpoint

    res_path, samples_path = out / name / "eval.json", out / name / "samples.jsonl"
    cfg = eval_config(args)
    prompts = prompts_of(args)
    ppl_ok, to_sample, to_score = _texts_current(args, info)
    if args.stage == "score" and (to_sample or not ppl_ok):
        raise FileNotFoundError(f"{name}: {len(to_sample)} sample sets missing in {samples_path} "
                                "(run --stage evaluate --no-mauve with these settings first)")
    rows = _read_samples(samples_path, prompts)

    def save():
        _write_samples(samples_path, rows)
        _write_json(res_path, info)

    if not ppl_ok or to_sample:
        model, tokenizer = load_checkpoint(info["model_dir"], device="cuda" if _cuda() else "cpu")
        sampler = None
        if is_sequencematch_checkpoint(model, tokenizer):  # backspace-aware sampling; perplexity masks <bkspc>
            from emo_trainer.objectives.sequencematch.sampler import sample_continuations_with_backspace

            sampler = sample_continuations_with_backspace
        if not ppl_ok:
            t0 = time.perf_counter()
            ppl = document_perplexity(model, tokenizer, test_documents(args), block_size=args.block_size,
                                      max_blocks=args.ppl_blocks)
            info["ppl"] = {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "ppl_tokens": ppl["num_tokens"],
                           "ppl_blocks": ppl["num_blocks"], "perplexity_runtime": round(time.perf_counter() - t0, 1),
                           "settings": _pick(args, _PPL_ARGS)}
            save()
        for key, settings, d, seed in to_sample:
            t0 = time.perf_counter()
            ucfg = dataclasses.replace(cfg, seeds=(seed,), decodings=(), mauve=False, temperature=d.temperature,
                                       top_k=d.top_k, top_p=d.top_p)
            sampler_cb = GenerationEvalCallback(prompts, ucfg, tokenizer, compute_perplexity=False, sampler=sampler)
            [metrics] = sampler_cb.per_seed_metrics(model)
            for r, text in zip(rows, sampler_cb.last_continuations[("", seed)]):
                r[key] = text
            info["units"][key] = {"settings": settings, "mauve_settings": None, "metrics": metrics,
                                  "runtime": round(time.perf_counter() - t0, 1)}
            save()
            logger.info("%s %s: rep-2 %.4f (%.0f s)", name, key, metrics["rep_2"], time.perf_counter() - t0)
            if not args.no_mauve:
                to_score.append((key, settings, d, seed))
    if to_score and not (args.no_mauve and args.stage != "score"):
        scorer = GenerationEvalCallback(
            prompts, dataclasses.replace(cfg, mauve=True), None, compute_perplexity=False,
            featurizer=featurizer_of(args), reference_features=np.load(out / "reference_features.npy"))
        for key, *_ in to_score:
            t0 = time.perf_counter()
            unit = info["units"][key]
            unit["metrics"].update(scorer.mauve_metrics([r[key] for r in rows]))
            unit["mauve_settings"] = _pick(args, _MAUVE_ARGS)
            unit["runtime"] = round(unit.get("runtime", 0.0) + time.perf_counter() - t0, 1)
            save()
            logger.info("%s %s: mauve %.4f", name, key, unit["metrics"]["mauve"])
    return info


def _packed_blocks(tokenizer, text: str, block_size: int, n: int):
    import torch

    ids = tokenizer(text, verbose=False)["input_ids"][: n * block_size]
    if len(ids) < n * block_size:
        raise ValueError(f"the probe needs {n} blocks of {block_size} tokens; the text has {len(ids)} tokens")
    return torch.tensor(ids).view(n, block_size)


def gradient_probe(model, objectives: dict, train_blocks, heldout_blocks, *, learning_rate: float, steps: int,
                   batch_size: int, tokenizer=None) -> dict:
    """How each objective's updates move the held-out cross-entropy of ``model`` (restored after each).

    For every objective: its diagnostics on the first batch; the cosine between its parameter
    gradient and MLE's; ``heldout_dce_first_step_per_lr`` = −⟨∇CE_heldout, sign(g)⟩, the first-order
    change of held-out CE per unit learning rate of the first AdamW step (which moves every
    parameter by lr·sign(g)); and the held-out CE after 1, ``steps``//2 and ``steps`` real AdamW
    steps (no weight decay, constant ``learning_rate``) on successive batches of ``train_blocks``.
    A negative first-step number means the objective's first update lowers held-out CE.
    """
    import copy

    import torch

    def flat_grad():
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    def heldout_ce():
        with torch.no_grad():
            return float(model(heldout_blocks, labels=heldout_blocks).loss)

    state0 = copy.deepcopy(model.state_dict())
    model.zero_grad()
    model(heldout_blocks, labels=heldout_blocks).loss.backward()
    g_heldout = flat_grad()
    result: dict = {"heldout_ce_start": heldout_ce(), "learning_rate": learning_rate, "steps": steps,
                    "batch_size": batch_size, "block_size": int(train_blocks.shape[1]), "objectives": {}}
    g_mle = None
    checkpoints = sorted({1, max(1, steps // 2), steps})
    for name, obj in objectives.items():
        model.load_state_dict(state0)
        obj.setup(model, tokenizer)
        model.zero_grad()
        first = train_blocks[:batch_size]
        out = obj(model(first).logits, first)
        out.loss.backward()
        g = flat_grad()
        g_mle = g if g_mle is None else g_mle
        r = {"metrics": {k: float(v) for k, v in out.metrics.items()},
             "param_cos_with_first": float(torch.nn.functional.cosine_similarity(g, g_mle, dim=0)),
             "heldout_dce_first_step_per_lr": float(-(g_heldout * g.sign()).sum()),
             "heldout_ce_after_steps": {}}
        opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        for step in range(1, steps + 1):
            lo = ((step - 1) * batch_size) % max(1, len(train_blocks) - batch_size + 1)
            xb = train_blocks[lo: lo + batch_size]
            obj.on_step_begin(model, step - 1)
            opt.zero_grad()
            obj(model(xb).logits, xb).loss.backward()
            opt.step()
            if step in checkpoints:
                r["heldout_ce_after_steps"][step] = heldout_ce()
        result["objectives"][name] = r
        logger.info("probe %s: cos %.3f, first-step dCE/lr %.1f, held-out CE %s", name, r["param_cos_with_first"],
                    r["heldout_dce_first_step_per_lr"], r["heldout_ce_after_steps"])
    model.load_state_dict(state0)
    return result


def run_probe(args, rows: list[Row], out: Path) -> dict:
    """``--stage probe``: :func:`gradient_probe` of every calibrated row's objective (with its
    overrides) on the base checkpoint, over the calibration set (train) and the validation text
    (held out); the first row is the reference of the cosines (put ``mle`` first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emo_trainer.config import build_objective, load_config

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if _cuda():
        model = model.cuda()
    objectives = {}
    for row in rows:
        if row.objective in ("none", "sequencematch"):
            continue  # nothing to train / needs its own model surgery and sampler
        cfg = load_config(args.config, calibration_overrides(args, row, out))
        objectives[row.name] = build_objective(cfg.objective)
    n = args.probe_steps * args.probe_batch_size + args.probe_batch_size
    calib = (out / "calibration_set.txt").read_text(encoding="utf-8")
    train = _packed_blocks(tokenizer, calib, args.block_size, n).to(model.device)
    held = _packed_blocks(tokenizer, validation_file(args, out).read_text(encoding="utf-8"), args.block_size,
                          args.probe_batch_size).to(model.device)
    result = gradient_probe(model, objectives, train, held, learning_rate=args.learning_rate, steps=args.probe_steps,
                            batch_size=args.probe_batch_size, tokenizer=tokenizer)
    result["model"] = args.model
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    return result


def calibrate(args, row: Row) -> dict:
    """Calibrate one row's model (resumable: an interrupted run resumes from its last complete
    checkpoint; a finished one, with ``final/config.json``, is not redone). Returns its info."""
    out = Path(args.output_dir)
    info: dict = {"objective": row.objective, "label": row.label, "overrides": list(row.overrides)}
    if row.objective == "none":
        info["model_dir"] = args.model
        return info
    from emo_trainer.cli import run
    from emo_trainer.config import load_config
    from emo_trainer.trainer import last_complete_checkpoint

    model_dir = out / row.name / "final"
    info["model_dir"] = str(model_dir)
    info_path = out / row.name / "train_info.json"
    if (model_dir / "config.json").is_file():
        if info_path.is_file():
            info.update(json.loads(info_path.read_text()))
        return info
    if args.stage in ("evaluate", "score"):
        raise FileNotFoundError(f"{row.name}: no calibrated model in {model_dir} (run with --stage calibrate or all first)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = load_config(args.config, calibration_overrides(args, row, out))
    # an interrupted calibration resumes from its last complete checkpoint (a half-written
    # later one is skipped); one that died before its first checkpoint starts over
    last = last_complete_checkpoint(out / row.name)
    metrics = run(cfg, resume_from_checkpoint="true" if last else None, overwrite_output_dir=True)
    info["train_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    info["train_runtime"] = round(time.perf_counter() - t0, 1)  # of this run only: a resumed one says where it began
    if last:
        info["resumed_from_step"] = int(Path(last).name.split("-")[-1])
    info_path.write_text(json.dumps({k: info[k] for k in ("train_metrics", "train_runtime", "resumed_from_step")
                                     if k in info}, indent=2))
    return info


class RowBusyError(RuntimeError):
    """Another study process is working on this row (two writers would mix their results)."""


@contextlib.contextmanager
def row_lock(out: Path, name: str):
    """An exclusive lock on one row's directory for as long as a process works on it: a second
    study command on the same directory (or a worker whose study process died, still saving)
    cannot write into the same run.  The lock goes with the process that holds it."""
    import fcntl

    (out / name).mkdir(parents=True, exist_ok=True)
    path = out / name / ".study.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise RowBusyError(f"{name}: another process (pid {holder}) is working on {out / name}; wait for it to "
                               f"finish or stop it (kill -TERM {holder} saves a checkpoint), then run the study again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: Set while this process works on a row (the pool workers' watchdog exits only when it is clear).
_BUSY = threading.Event()


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose study process died finishes the row it is on (holding the
    row's lock, so nothing else writes there) and then exits, instead of idling on as an orphan.

    To stop a study and its workers, signal the process group (``kill -TERM -- -PGID``, Ctrl-C in
    a terminal, ``timeout``, a batch scheduler): every calibration saves a checkpoint and stops,
    and the next run resumes from it."""

    def watch():
        while os.getppid() == parent or _BUSY.is_set():
            time.sleep(2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_one(args, row: Row) -> dict:
    """Calibrate (unless 'none') and evaluate one row; resumable via <name>/eval.json, unit by unit.
    Holds the row's lock (:func:`row_lock`) while it works."""
    with row_lock(Path(args.output_dir), row.name):
        _BUSY.set()
        try:
            return _run_one(args, row)
        finally:
            _BUSY.clear()


def _run_one(args, row: Row) -> dict:
    out = Path(args.output_dir)
    res_path = out / row.name / "eval.json"
    info = load_evaluation(res_path) if res_path.is_file() else None
    if info is not None:
        view = evaluation_view(args, info)
        if args.stage == "calibrate":
            return info
        if view and not (view.get("mauve_pending") and not args.no_mauve):  # nothing to compute
            if info.get("eval_settings") != view["eval_settings"] or info.get("legacy_layout"):
                info = {**{k: info[k] for k in (*_CALIBRATION_KEYS, "ppl", "units") if k in info}, **view}
                _write_json(res_path, info)  # the results of this request, from the units already there
            return info
    if args.stage == "score" and info is None:
        raise FileNotFoundError(f"{row.name}: no evaluation to score in {res_path} (run --stage evaluate --no-mauve first)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    (out / row.name).mkdir(parents=True, exist_ok=True)
    if args.stage == "score":  # MAUVE from the kept samples: the model need not be here (a GPU call brings none back)
        base = {k: info[k] for k in _CALIBRATION_KEYS if k in info}
    else:
        base = calibrate(args, row)
    if args.stage == "calibrate":
        return base
    info = {**{k: base[k] for k in _CALIBRATION_KEYS if k in base},
            "ppl": (info or {}).get("ppl"), "units": (info or {}).get("units", {})}
    t1 = time.perf_counter()
    info = evaluate_model(args, row.name, info, out)
    view = evaluation_view(args, info)
    info = {**{k: info[k] for k in (*_CALIBRATION_KEYS, "ppl", "units") if k in info}, **(view or {}),
            "eval_runtime": round(time.perf_counter() - t1, 1)}
    _write_json(res_path, info)
    return info


# --------------------------------------------------------------------------- outputs


def _fmt(v, std=None, digits=4) -> str:
    if v is None:
        return "–"
    s = f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return f"{s} ± {std:.2g}" if std is not None else s


def paired_difference(row: dict, baseline: dict, key: str = "mauve") -> dict | None:
    """``key`` of ``row`` minus ``baseline``, paired seed by seed (the same prompts and sampling
    seeds): the mean difference, the std of the per-seed differences, the larger of the two rows'
    own spreads over seeds, and a plain verdict — ``within noise`` when the mean difference is at
    most twice that spread, else ``better``/``worse`` (larger is better).  None without common seeds."""
    import statistics

    def by_seed(r):  # per_seed entries name their seeds in ``seeds`` (older results: by position)
        return dict(zip(r.get("seeds") or range(len(r.get("per_seed", []))), r.get("per_seed", [])))

    a, b = by_seed(row), by_seed(baseline)
    pairs = [(a[s][key], b[s][key]) for s in a if s in b and key in a[s] and key in b[s]]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    mean = statistics.fmean(diffs)
    n = len(pairs)
    # each row's own spread over all its seeds; the larger one that exists judges the difference
    spreads = [statistics.stdev(v) for v in ([m[key] for m in r.values() if key in m] for r in (a, b)) if len(v) > 1]
    spread = max(spreads) if spreads else None
    if spread is None:
        verdict = "one seed: no spread to judge by"
    elif abs(mean) <= 2 * spread:
        verdict = "within noise"
    else:
        verdict = "better" if mean > 0 else "worse"
    if spread is not None and n == 1:
        verdict += " (one seed)"
    return {"key": key, "seeds": n, "mean_difference": mean,
            "std_of_differences": statistics.stdev(diffs) if n > 1 else None, "spread": spread, "verdict": verdict}


def decoding_names(results: dict) -> list[str]:
    """The study's decoding settings by name, pure sampling (``""``) first: the metric-key prefixes."""
    return [""] + [d["name"] for d in results["protocol"].get("decodings", [])]


def verdict_table(results: dict, baseline: str = "MLE") -> str:
    """Each row's MAUVE against ``baseline`` (for every decoding setting), paired over seeds.

    The verdicts judge sampling noise only (:func:`paired_difference`); a second training seed of
    a row (``mle-seed43=mle:training.seed=43``) shows how far training noise moves it."""
    from emo_trainer.evaluation.config import metric_key

    rows = results["checkpoints"]
    if baseline not in rows:
        return ""
    names = decoding_names(results)
    lines = [(f"**MAUVE against {baseline}** (paired over sampling seeds; within noise = the difference is at most "
             "twice the larger spread over sampling seeds. Each row is one training run: the spread of training "
             "runs is not in the rule, and it can be larger, e.g. under top-p)"), "",
             "| model | decoding | seeds | Δ MAUVE | std of Δ | spread | verdict |", "|---|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if name == baseline:
            continue
        for dec in names:
            d = paired_difference(r, rows[baseline], metric_key(dec, "mauve"))
            if d is None:
                continue
            lines.append(f"| {name} | {dec or 'pure sampling'} | {d['seeds']} | {d['mean_difference']:+.3f} | "
                         f"{_fmt(d['std_of_differences'], digits=2)} | {_fmt(d['spread'], digits=2)} | {d['verdict']} |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def markdown(results: dict) -> str:
    """One table per decoding setting (pure sampling first), perplexity in each."""
    cols = [("perplexity", "test ppl ↓"), ("seeds", "seeds"), ("mauve", "MAUVE ↑"), ("diversity", "diversity"), ("rep_2", "rep-2"),
            ("rep_3", "rep-3"), ("rep_4", "rep-4"), ("seq_rep_4", "seq-rep-4"), ("distinct_2", "distinct-2"),
            ("mean_length", "words")]
    from emo_trainer.evaluation.config import metric_key

    names = decoding_names(results)
    parts = []
    for dec in names:
        key = (lambda k, dec=dec: k if k == "perplexity" else metric_key(dec, k))
        title = "pure sampling" if not dec else dec
        lines = [f"**{title}**", "", "| model | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, r in results["checkpoints"].items():
            n = len(r["seeds_by_decoding"].get(dec, [])) if "seeds_by_decoding" in r else len(r.get("per_seed", []))
            cells = [str(n) if k == "seeds" else _fmt(r.get(key(k)), r.get(f"{key(k)}_std")) for k, _ in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        ref = results["reference"]
        cells = ["–", "–", "–"] + [_fmt(ref.get(k)) for k, _ in cols[3:]]
        lines.append("| human (reference continuations) | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    verdicts = verdict_table(results)
    if verdicts:
        parts.append(verdicts)
    return "\n".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emo_trainer.evaluation.config import metric_key

    names = list(results["checkpoints"])
    n_seeds = max((len(c.get("per_seed", [])) for c in results["checkpoints"].values()), default=0)
    decodings = decoding_names(results)  # side by side in the MAUVE panel (``mauve``, ``top_p0.95_mauve``, ...)
    hatched = "; hatched: other decodings" if len(decodings) > 1 else ""
    panels = [("perplexity", "test perplexity (log)"), ("mauve", f"MAUVE (± std, {n_seeds} seeds{hatched})"),
              ("diversity", "diversity (human dashed)"), ("rep_2", "rep-2 (human dashed)"),
              ("seq_rep_4", "seq-rep-4 (human dashed)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, panels):
        keys = [metric_key(d, key) for d in decodings] if key == "mauve" else [key]
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            vals = [results["checkpoints"][n].get(k) for n in names]
            errs = [results["checkpoints"][n].get(f"{k}_std", 0.0) for n in names]
            xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width=width, yerr=errs if any(errs) else None,
                   capsize=2, color=[colors[i % len(colors)] for i in range(len(names))],
                   hatch="//" if j else None, alpha=0.55 if j else 1.0, edgecolor="black" if j else None,
                   linewidth=0.3, label=(decodings[j] or "pure sampling") if len(keys) > 1 else None)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        if key in results["reference"]:
            ax.axhline(results["reference"][key], color="black", linestyle="--", linewidth=1)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(out: Path, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    drawn = False
    for row in rows:
        state = out / row.name / "trainer_state.json"
        if not state.is_file():
            continue
        hist = json.loads(state.read_text())["log_history"]
        pts = [(h["step"], h["train/ce"] if "train/ce" in h else h.get("ce")) for h in hist]
        pts = [(s, v) for s, v in pts if v is not None]
        if not pts:
            pts = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=row.label)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("training CE (or loss)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args, out: Path, sizing: dict) -> dict:
    from emo_trainer.evaluation.metrics.repetition import repetition_metrics

    prompts = prompts_of(args)
    results = {
        "protocol": {"model": args.model, "featurizer": args.featurizer or args.model, "test_file": args.test_file,
                     "detokenized_test": args.detokenize != "none" and not args.no_detokenize_test,
                     "eval": dataclasses.asdict(eval_config(args)), "num_prompts_built": len(prompts),
                     "decodings": [dataclasses.asdict(d) for d in eval_config(args).decoding_settings()[1:]], **sizing},
        "reference": repetition_metrics([p.reference for p in prompts]),
        "checkpoints": {},
        "missing": [],     # rows with nothing evaluated under these settings
        "incomplete": {},  # rows reported from some of their units: row -> the units still missing
    }
    for row in rows_of(args):
        path = out / row.name / "eval.json"
        info = load_evaluation(path) if path.is_file() else None
        view = evaluation_view(args, info, partial=True) if info else None
        if view:
            results["checkpoints"][row.label] = {**{k: info[k] for k in _CALIBRATION_KEYS if k in info}, **view}
            if view.get("incomplete"):
                results["incomplete"][row.name] = view["incomplete"]
        else:
            results["missing"].append(row.name)
    return results


def write_outputs(args, out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    if results["checkpoints"]:
        plot(results, out / "results.png")
    plot_training(out, [r for r in rows_of(args) if r.objective != "none"], out / "train_loss.png")
    # the comparison reads the scripts/evaluate.py layout, where the human values are ``ref_*`` keys.
    compat = {**results, "reference": {f"ref_{k}": v for k, v in results["reference"].items()}}
    (out / "compare_input.json").write_text(json.dumps(compat))
    from emo_trainer.evaluation.compare import main as compare

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compare([str(out / "compare_input.json"), "--output-dir", str(out)])
    except Exception as e:  # noqa: BLE001 - the comparison table is a by-product: never lose the study's results to it
        logger.warning("compare.md not written: %s", e)
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
_EXECUTION_ARGS = ("objectives", "output_dir", "jobs", "threads", "docs_dir", "report_only", "stage", "no_mauve",
                   "probe_steps", "probe_batch_size")


#: Arguments that make the calibrated models: a study directory is never resumed with other values.
_CALIBRATION_ARGS = ("config", "model", "train_file", "valid_file", "detokenize", "sentences", "learning_rate",
                     "block_size", "batch_size", "seed", "set")


def evaluation_settings(args) -> dict:
    """The arguments that change an evaluation (not a calibration): a model evaluated with other
    values is evaluated again, its calibration kept."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _EXECUTION_ARGS and k not in _CALIBRATION_ARGS}


def check_settings(args, out: Path) -> str | None:
    """A study directory is resumed only with the calibration settings it was made with
    (``study_settings.json``): models made differently would otherwise be mixed.  Evaluation
    settings may change (each ``eval.json`` records its own; a stale one is redone).
    Returns an error message, or None (and records the settings of a new study)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k in _CALIBRATION_ARGS}
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
    try:
        rows = rows_of(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_settings(args, out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # the detokenized validation copy first: building the calibration set loads the config, which
    # checks that data.validation_files exists (a fresh --output-dir had none: issue 14)
    validation_file(args, out, write=True)
    sents = build_calibration_set(args, out)
    logger.info("calibration set: %d sentences in %s", len(sents), out / "calibration_set.txt")
    if args.stage == "probe":
        print(json.dumps(run_probe(args, rows, out), indent=2))
        return 0
    if args.stage != "calibrate" and not (args.no_mauve and args.stage != "score"):
        prompts = prompts_of(args)
        reference_features(args, out, prompts)
        logger.info("reference features of %d prompts cached in %s", len(prompts), out / "reference_features.npy")
    sizing = sizing_of(args, len(sents))
    failed = {}
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_one, args, row): row.name for row in rows}
            for fut in cf.as_completed(futures):
                obj = futures[fut]
                try:
                    fut.result()
                    logger.info("done: %s (%.0f s since start)", obj, time.perf_counter() - start)
                except RowBusyError as e:
                    failed[obj] = str(e)
                    logger.error("%s", e)
                except Exception as e:  # one failing objective must not lose the others
                    failed[obj] = f"{type(e).__name__}: {e}"
                    logger.exception("failed: %s", obj)
                write_outputs(args, out, collect(args, out, sizing))
    else:
        for row in rows:
            obj = row.name
            try:
                run_one(args, row)
            except RowBusyError as e:
                failed[obj] = str(e)
                logger.error("%s", e)
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


