"""Bad input through the training CLI: each case gives ONE line ``error: ...`` and exit code 2, no traceback.

The table in docs/errors.md lists the same cases with the exact line a user sees.  Cases that
only need the config fail in milliseconds; the data/model ones run the pipeline on 100 documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emo_trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/quickstart.yaml")
SMALL = ["--data.max_train_samples", "100", "--data.max_eval_samples", "60", "--data.block_size", "32",
         "--eval.generation", "false", "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
         "--model.train_tokenizer_vocab_size", "300",
         "--model.config", "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}"]


def _file(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def _data(files: str, *extra: str) -> list[str]:
    return ["--config", QUICK, *SMALL, "--data.dataset", "null", "--data.train_files", f"[{files}]",
            "--data.validation_files", f"[{files}]", *extra]


def _cost_file(tmp_path: Path) -> str:
    from safetensors.torch import save_file

    p = tmp_path / "cost.safetensors"
    save_file({"weight": torch.randn(50, 8)}, str(p))
    return str(p)


def _incomplete_checkpoint(tmp_path: Path) -> str:
    d = tmp_path / "run" / "checkpoint-4"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"")
    return str(d)


# id → (argv builder, a part of the message)
CASES = {
    "malformed_yaml": (lambda t: ["--config", _file(t, "bad.yaml", "model: [unclosed\n  data: 3\n")],
                       "malformed YAML in"),
    "yaml_not_a_mapping": (lambda t: ["--config", _file(t, "list.yaml", "- model\n- data\n")],
                           "the config must be a mapping"),
    "missing_yaml": (lambda t: ["--config", str(t / "nope.yaml")], "config file not found"),
    "unknown_section": (lambda t: ["--config", _file(t, "s.yaml", Path(QUICK).read_text() + "\nmodle: {}\n")],
                        "unknown section 'modle' (did you mean model?)"),
    "unknown_key_yaml": (lambda t: ["--config", _file(t, "k.yaml", Path(QUICK).read_text().replace(
        "  max_steps: 300", "  max_step: 300"))], "unknown key 'training.max_step'"),
    "unknown_key_cli": (lambda t: ["--config", QUICK, "--learning_rat", "1e-3"], "unknown key '--learning_rat'"),
    "unknown_objective": (lambda t: ["--config", QUICK, "--objective", "emd"], "unknown objective 'emd'"),
    "unknown_objective_option": (lambda t: ["--config", QUICK, "--emo.mdoe", "2"], "unknown key 'objective.emo.mdoe'"),
    "wrong_type": (lambda t: ["--config", QUICK, "--data.block_size", "abc"], "data.block_size: expected an integer"),
    "wrong_type_training": (lambda t: ["--config", QUICK, "--max_steps", "many"], "training.max_steps: expected an integer"),
    "negative_lr": (lambda t: ["--config", QUICK, "--learning_rate", "-1e-3"],
                    "training.learning_rate: must be a positive number"),
    "eta_out_of_range": (lambda t: ["--config", QUICK, "--objective", "mixce", "--mixce.eta", "1.5"],
                         "objective.mixce:"),
    "missing_data_file": (lambda t: ["--config", QUICK, "--data.dataset", "null", "--data.train_files",
                                     f"[{t / 'missing.txt'}]"], "file not found"),
    "empty_dataset": (lambda t: _data(_file(t, "empty.txt", "\n   \n\n")), "has no usable text"),
    "empty_column": (lambda t: _data(_file(t, "e.jsonl", '{"text": ""}\n{"text": "  "}\n')), "has no usable text in column 'text'"),
    "missing_column": (lambda t: _data(_file(t, "c.jsonl", '{"body": "hello there"}\n')), "column 'text' not in"),
    "text_shorter_than_block": (lambda t: _data(_file(t, "short.txt", "Anna went home.\nBen sat.\n"),
                                                "--data.block_size", "64"), "fewer than one block"),
    "non_utf8_text": (lambda t: _data(_file(t, "latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))), "not valid UTF-8"),
    "non_utf8_jsonl": (lambda t: _data(_file(t, "latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))),
                       "not valid UTF-8"),
    "model_not_found": (lambda t: ["--config", QUICK, "--model.config", "null", "--model.train_tokenizer_vocab_size", "null",
                                   "--model.name_or_path", str(t / "no-such-model")],
                        ("model.name_or_path: '", "no-such-model' does not exist")),
    "tokenizer_not_found": (lambda t: ["--config", QUICK, "--model.train_tokenizer_vocab_size", "null",
                                       "--model.tokenizer", str(t / "no-such-tokenizer")],
                            ("model.tokenizer: '", "no-such-tokenizer' does not exist")),
    "vocab_mismatch": (lambda t: ["--config", QUICK, *SMALL, "--model.config",
                                  "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, vocab_size: 100}"],
                       "tokenizer/model vocabulary mismatch: the tokenizer has 300 tokens"),
    "emo_cost_wrong_vocab": (lambda t: ["--config", QUICK, *SMALL, "--objective", "emo", "--emo.cost_embedding", _cost_file(t)],
                             "EMO cost embedding has 50 rows but the model's output layer has 300"),
    "emo_cost_missing": (lambda t: ["--config", QUICK, *SMALL, "--objective", "emo", "--emo.cost_embedding",
                                    str(t / "gpt2-head")], "is neither 'initial', 'live' nor an existing"),
    "mauve_too_few_prompts": (lambda t: ["--config", QUICK, *SMALL, "--eval.generation", "true", "--eval.num_prompts", "10"],
                              "MAUVE needs at least 50 texts per side"),
    "resume_nothing": (lambda t: ["--config", QUICK, "--output_dir", str(t / "fresh"), "--resume_from_checkpoint", "true"],
                       "no complete checkpoint in"),
    "resume_missing_path": (lambda t: ["--config", QUICK, "--resume_from_checkpoint", str(t / "run" / "checkpoint-9")],
                            "is not a directory"),
    "resume_incomplete": (lambda t: ["--config", QUICK, "--resume_from_checkpoint", _incomplete_checkpoint(t)],
                          "is incomplete (no checkpoint_complete.json"),
    # Found by a user audit: each was a traceback, a late failure or a silent mix-up.
    "flag_without_value": (lambda t: ["--config", QUICK, "--objective"], "--objective needs a value"),
    "bare_objective_option": (lambda t: ["--config", QUICK, "--objective", "mixce", "--eta", "0.3"],
                              "unknown key '--eta': an objective option, give its objective: --mixce.eta"),
    "bad_option_of_unused_objective": (lambda t: ["--config", QUICK, "--emo.mode", "3"],
                                       "objective.emo: EMO mode must be 1 or 2, got 3"),
    "malformed_cli_value": (lambda t: ["--config", QUICK, "--data.train_files", "[a, b"], "data.train_files: malformed value"),
    "one_text_no_validation": (lambda t: ["--config", QUICK, *SMALL, "--data.dataset", "null", "--data.train_files",
                                          f"[{_file(t, 'one.txt', 'Only one line of text here.')}]"],
                               "the training data has 1 text(s), too few to hold out"),
    "block_size_over_positions": (lambda t: ["--config", QUICK, *SMALL, "--data.block_size", "128"],
                                  "data.block_size: 128 tokens per row, but the model has 64 positions (transformer.wpe)"),
    "report_to_not_installed": (lambda t: ["--config", QUICK, "--report_to", "clearml"],
                                "training.report_to: clearml is not installed (pip install clearml)"),
    "report_to_unknown": (lambda t: ["--config", QUICK, "--report_to", "tensorbord"],
                          "training.report_to: unknown integration 'tensorbord' (did you mean tensorboard?)"),
    "featurizer_unavailable": (lambda t: ["--config", QUICK, "--eval.mauve_featurizer", str(t / "no-featurizer")],
                               ("eval.mauve_featurizer: '", "no-featurizer' does not exist")),
    "featurizer_offline_hub_id": (lambda t: ["--config", QUICK, "--eval.mauve_featurizer", "gpt2-large"],
                                  "eval.mauve_featurizer: cannot load 'gpt2-large'"),
    "output_dir_holds_a_run": (lambda t: ["--config", QUICK, "--output_dir", _earlier_run(t)],
                               "already holds a run (checkpoint-10/, final/): pass --resume_from_checkpoint true"),
}


def _earlier_run(tmp_path: Path) -> str:
    run = tmp_path / "earlier"
    for d in ("checkpoint-10", "final"):
        (run / d).mkdir(parents=True)
    return str(run)


def run_case(name: str, tmp_path: Path, capsys) -> tuple[int, str]:
    build, _ = CASES[name]
    argv = build(tmp_path)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name, tmp_path, capsys):
    rc, err = run_case(name, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    expected = CASES[name][1]
    for part in [expected] if isinstance(expected, str) else expected:
        assert part in errors[0], errors[0]
    assert "Traceback" not in err


def test_safe_defaults_and_safetensors_checkpoints(tmp_path):
    """trust_remote_code is off unless the config says so; YAML is read with safe_load; weights are
    saved as safetensors (no pickle of weights); objective state is safetensors + JSON."""
    from emo_trainer.config import ModelConfig, load_config

    assert ModelConfig().trust_remote_code is False
    assert load_config(QUICK).model.trust_remote_code is False
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    rc = main(["--config", str(evil)])
    assert rc == 2  # a YAML tag that would run code is refused by safe_load

    out = tmp_path / "run"
    assert main(["--config", QUICK, *SMALL, "--objective", "emo", "--emo.cost_embedding", "live", "--max_steps", "2",
                 "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]) == 0
    for d in (out / "final", out / "checkpoint-2"):
        files = {p.name for p in d.iterdir()}
        assert "model.safetensors" in files
        # weights never pickled; training_args.bin is the Trainer's pickled TrainingArguments, never loaded
        assert not any(f.endswith((".bin", ".pkl", ".pickle")) for f in files - {"training_args.bin"}), files
    # objective state: JSON + safetensors only (EMO `live` keeps no tensor; the marker is JSON)
    ck = out / "checkpoint-2"
    assert json.loads((ck / "checkpoint_complete.json").read_text())["global_step"] == 2
    # what remains pickled is the Trainer's own optimizer/scheduler/RNG state, loaded with weights_only=True
    assert {p.name for p in ck.iterdir() if p.suffix in (".pt", ".pth")} <= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


def test_overwrite_output_dir_starts_over_and_a_warning_names_unused_options(tmp_path, capsys, caplog):
    """--overwrite_output_dir deletes the earlier run's checkpoints and results, then trains; an
    option of an objective that is not selected is reported as having no effect."""
    run = Path(_earlier_run(tmp_path))
    (run / "final_metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    argv = ["--config", QUICK, *SMALL, "--output_dir", str(run), "--overwrite-output-dir", "--emo.mode", "2"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert not (run / "checkpoint-10").exists() and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "final_metrics.json").read_text())["eval_loss"] > 0
    assert any("--emo.mode has no effect: the objective is 'mle'" in r.getMessage() for r in caplog.records)


def test_overwrite_runs_the_other_checks_before_deleting(tmp_path, capsys):
    """--overwrite_output_dir deletes nothing when another check stops the run, and refuses to
    delete a model the config reads from the old run."""
    run = Path(_earlier_run(tmp_path))
    assert main(["--config", QUICK, "--output_dir", str(run), "--overwrite_output_dir", "--report_to", "clearml"]) == 2
    assert (run / "checkpoint-10").is_dir() and (run / "final").is_dir()
    (run / "final" / "config.json").write_text("{}")
    rc = main(["--config", QUICK, "--output_dir", str(run), "--overwrite_output_dir",
               "--model.name_or_path", str(run / "final")])
    assert rc == 2 and "would delete" in capsys.readouterr().err
    assert (run / "final" / "config.json").is_file()


def test_bare_flag_for_a_key_that_takes_a_bool_among_other_types():
    from emo_trainer.config import load_config

    cfg = load_config(QUICK, ["--include_num_input_tokens_seen"])
    assert cfg.training["include_num_input_tokens_seen"] in (True, "true", "True")
