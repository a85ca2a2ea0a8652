"""Whole runs on the quickstart setting: every objective lowers the eval CE; the CLI works."""

from __future__ import annotations

import json

import pytest

from emo_trainer.cli import build_trainer, main
from emo_trainer.config import load_config
from emo_trainer.objectives import available

QUICK = "configs/quickstart.yaml"


def _small(tmp_path, objective, steps=80, extra=()):
    return load_config(
        QUICK,
        [
            "--objective", objective, "--output_dir", str(tmp_path / objective), "--max_steps", str(steps),
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50",
            "--eval.generation", "false", "--data.max_eval_samples", "60", "--data.block_size", "32",
            "--model.config", "{model_type: gpt2, n_layer: 1, n_embd: 64, n_head: 2, n_positions: 64}",
            "--warmup_steps", "0", *extra,
        ],
    )


@pytest.mark.parametrize("objective", [o for o in ("mle", "emo", "mixce", "mile", "sequencematch") if o in available()])
def test_each_objective_lowers_eval_ce(tmp_path, objective):
    cfg = _small(tmp_path, objective)
    trainer, _ = build_trainer(cfg)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before - 1.0, (before, after)
    assert after["eval_perplexity"] == pytest.approx(2.718281828 ** after["eval_loss"], rel=1e-6)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(k in logged[-1] for k in ("ce",))  # objective diagnostics reach the logs


def test_cli_quickstart_writes_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([
        "--config", QUICK, "--output_dir", str(out), "--max_steps", "20", "--eval_steps", "10",
        "--save_steps", "10", "--eval.generation", "false", "--data.max_eval_samples", "30",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "run directory" in printed and "eval_loss=" in printed
    assert (out / "emo_trainer_config.yaml").exists()
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "checkpoint-20" / "checkpoint_complete.json").exists()
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["eval_perplexity"] > 1


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "no config given"),
        (["--config", "nope.yaml"], "config file not found"),
        (["--config", QUICK, "--objective", "bogus"], "unknown objective 'bogus'"),
        (["--config", QUICK, "--data.train_files", "[missing.txt]", "--data.dataset", "null"], "file not found"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, capsys, tmp_path):
    rc = main(argv + (["--output_dir", str(tmp_path)] if argv else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and needle in err and "\n" not in err


@pytest.mark.parametrize("objective", ["mle", "sequencematch"])
def test_generation_callback_installed_once_with_the_objectives_sampler(tmp_path, objective):
    from emo_trainer.evaluation import GenerationEvalCallback

    cfg = _small(tmp_path, objective, extra=("--eval.generation", "true", "--eval.num_prompts", "50",
                                             "--eval.prompt_words", "5", "--eval.continuation_words", "5",
                                             "--data.max_eval_samples", "100"))
    trainer, _ = build_trainer(cfg)
    cbs = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GenerationEvalCallback)]
    assert len(cbs) == 1
    if objective == "sequencematch":
        from emo_trainer.objectives.sequencematch.sampler import sample_continuations_with_backspace

        assert cbs[0].sampler is sample_continuations_with_backspace
    else:
        assert cbs[0].sampler is None
