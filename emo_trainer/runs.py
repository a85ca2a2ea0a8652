"""The layout of a run directory, in one place.

A training run (``scripts/train.py``, :func:`emo_trainer.cli.run`) writes into ``training.output_dir``::

    RUN/
      emo_trainer_config.yaml     the full resolved config (CONFIG_FILENAME)
      checkpoint-N/               Trainer checkpoints; complete ones carry checkpoint_complete.json
        trainer_state.json        log history (train and eval metrics)
        objective_state.json      the objective's state (+ objective_state.safetensors)
      final/                      the final model and tokenizer (a Hugging Face model directory)
      trainer_state.json          the final log history
      tokenizer/                  a tokenizer trained for the run (model.train_tokenizer_vocab_size)

Checkpoints and ``final/`` are model directories: :func:`emo_trainer.evaluation.checkpoints.load_checkpoint`
loads them; these helpers find the run a checkpoint belongs to.
"""

from __future__ import annotations

from pathlib import Path

#: the run's resolved config, written at the start of training
CONFIG_FILENAME = "emo_trainer_config.yaml"


def find_run_config(path: str | Path) -> Path | None:
    """The ``emo_trainer_config.yaml`` of the run ``path`` belongs to: ``path`` itself (a run
    directory), its parent (``RUN/final``, ``RUN/checkpoint-N``) or grandparent; None if there is none."""
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / CONFIG_FILENAME).is_file():
            return d / CONFIG_FILENAME
    return None


def read_run_config(path: str | Path) -> dict:
    """The saved config of the run ``path`` belongs to, as a raw dict ({} if none or unreadable)."""
    import yaml

    f = find_run_config(path)
    if f is None:
        return {}
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def run_objective(path: str | Path) -> str | None:
    """``objective.name`` of the run ``path`` belongs to (its saved config; the config's default
    ``mle`` when the section names none), or None when no saved config is found."""
    if find_run_config(path) is None:
        return None
    raw = read_run_config(path)
    if not raw:
        return None
    obj = raw.get("objective", {})
    name = obj.get("name", "mle") if isinstance(obj, dict) else obj
    return str(name) if name else None


def find_trainer_state(run: str | Path) -> Path | None:
    """``RUN/trainer_state.json``, else the one of the highest ``checkpoint-N``; None if neither exists."""
    run = Path(run)
    if (run / "trainer_state.json").is_file():
        return run / "trainer_state.json"
    ckpts = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None
