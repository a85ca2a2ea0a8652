"""A resume that cannot work stops with one line BEFORE anything in the run directory changes
(issue 18): another model size, another tokenizer vocabulary, another objective (unless
``--allow_objective_change``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from emo_trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/quickstart.yaml")
MODEL = "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}"


def _args(out: Path, *extra: str) -> list[str]:
    return ["--config", QUICK, "--output_dir", str(out), "--data.max_train_samples", "100", "--data.max_eval_samples",
            "40", "--data.block_size", "32", "--eval.generation", "false", "--eval_strategy", "no",
            "--model.train_tokenizer_vocab_size", "300", "--model.config", MODEL, "--save_steps", "2",
            "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(_args(out, "--max_steps", "2")) == 0
    (out / "final").rename(out / "final_kept")  # a run stopped at checkpoint-2 (final/ would not matter)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


CASES = {
    "model_size": (["--model.config", "{model_type: gpt2, n_layer: 1, n_embd: 64, n_head: 2, n_positions: 64}"],
                   "model.config.n_embd is 64 but"),
    "model_layers_not_in_config_keys": (["--model.config", ("{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, "
                                                            "n_positions: 64, tie_word_embeddings: false}")],
                                        "lm_head.weight"),
    "tokenizer_vocab_size": (["--model.train_tokenizer_vocab_size", "280"],
                             "model.train_tokenizer_vocab_size is 280 but the run in"),
    "tokenizer_vocabulary": (["--data.max_train_samples", "30"], "token(s) differ"),
    "objective": (["--objective", "emo"], "was trained with objective 'mle', this run asks for 'emo'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resume_that_cannot_work_changes_nothing(name, earlier_run, tmp_path, capsys):
    run = _copy(earlier_run, tmp_path)
    before = _snapshot(run)
    extra, message = CASES[name]
    rc = main(_args(run, "--max_steps", "4", "--resume_from_checkpoint", "true", *extra))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, err[-3000:]
    assert message in errors[0] and "--resume_from_checkpoint" in errors[0], errors[0]
    assert _snapshot(run) == before  # emo_trainer_config.yaml, tokenizer/, checkpoints: untouched


def test_objective_change_with_the_flag(earlier_run, tmp_path, caplog):
    run = _copy(earlier_run, tmp_path)
    rc = main(_args(run, "--max_steps", "4", "--resume_from_checkpoint", "true", "--objective", "emo",
                    "--allow_objective_change"))
    assert rc == 0
    assert json.loads((run / "checkpoint-4" / "checkpoint_complete.json").read_text())["objective"] == "emo"
    assert any("trained with objective 'mle') with objective 'emo'" in r.getMessage() for r in caplog.records)


def test_trainer_api_refuses_objective_change(earlier_run, tmp_path, tiny_tokenizer):
    """The library path (ObjectiveTrainer.train) refuses it too, with a ValueError."""
    from conftest import make_tiny_gpt2
    from transformers import TrainingArguments

    from emo_trainer.trainer import ObjectiveTrainer

    trainer = ObjectiveTrainer(model=make_tiny_gpt2(), objective="mixce",
                               args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none"),
                               train_dataset=[{"input_ids": [1, 2, 3]}], processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="trained with objective 'mle', this run asks for 'mixce'"):
        trainer.train(resume_from_checkpoint=str(earlier_run / "checkpoint-2"))


def test_lora_resume_is_checked_on_the_adapter(tmp_path, capsys):
    """A LoRA run's checkpoint holds the adapter only: its shapes are compared (rank 4 vs 8), and the
    same settings resume."""
    out = tmp_path / "lora"
    assert main(_args(out, "--max_steps", "2", "--model.lora", "{r: 4}")) == 0
    before = _snapshot(out)
    assert main(_args(out, "--max_steps", "4", "--resume_from_checkpoint", "true", "--model.lora", "{r: 8}")) == 2
    assert "lora_A.weight of shape [4, 32], this config builds [8, 32]" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(_args(out, "--max_steps", "4", "--resume_from_checkpoint", "true", "--model.lora", "{r: 4}")) == 0
