"""More bad input (issue 18): each case was a traceback, a misleading line or silently wrong; now
ONE line ``error: ...`` and exit code 2 (the table in docs/errors.md lists them with the lines)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_errors import QUICK, SMALL, _data, _file

from emo_trainer.cli import main


def _model_dir(tmp_path: Path, tokenizer: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    d = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=300,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(d)
    if tokenizer:
        train_bpe_tokenizer(make_corpus(50, seed=1), vocab_size=300, save_dir=d)
    return d


def _truncated_model(tmp_path: Path) -> str:
    d = _model_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(d)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _pickled_model(tmp_path: Path) -> str:
    import pickle

    d = _model_dir(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    return str(d)


def _pretrained(path: str) -> list[str]:
    return ["--config", QUICK, *SMALL, "--model.config", "null", "--model.train_tokenizer_vocab_size", "null",
            "--model.name_or_path", path]


def _mixed_jsonl(tmp_path: Path) -> str:
    rows = [f'{{"text": "story {i}: the cat sat on the mat and then it went home again"}}' for i in range(100)]
    rows[3], rows[10], rows[20] = '{"text": 5}', '{"text": ["a", "b"]}', '{"text": 7}'
    return _file(tmp_path, "mixed.jsonl", "\n".join(rows) + "\n")


def _train_and_validation(tmp_path: Path, validation: str) -> list[str]:
    train = _file(tmp_path, "ok.jsonl", '{"text": "a b c d e f g"}\n')
    valid = _file(tmp_path, "v.jsonl", validation)
    return ["--config", QUICK, *SMALL, "--data.dataset", "null", "--data.train_files", f"[{train}]",
            "--data.validation_files", f"[{valid}]"]


def _quick_with(tmp_path: Path, **sections) -> str:
    import yaml

    raw = yaml.safe_load(Path(QUICK).read_text())
    raw.update(sections)
    return _file(tmp_path, "changed.yaml", yaml.safe_dump(raw))


def _quick_yaml(tmp_path: Path, name: str, replace: tuple[str, str] | None = None, append: str = "") -> str:
    text = Path(QUICK).read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    return _file(tmp_path, name, text + append)


CASES = {
    # item 2: rows whose text is not a string were dropped without a word
    "jsonl_non_string_text": (lambda t: _data(_mixed_jsonl(t)),
                              ("3 of 100 rows of the train split hold no text string in column 'text'",
                               "mixed.jsonl line 4, a int: 5")),
    # item 6
    "objective_not_a_mapping": (lambda t: ["--config", _quick_with(t, objective=3)], "objective: expected a mapping of keys"),
    "eval_not_a_mapping": (lambda t: ["--config", _quick_with(t, eval=3)], "eval: expected a mapping of keys"),
    "duplicate_yaml_key": (lambda t: ["--config", _quick_yaml(t, "d.yaml", ("  max_steps: 300", "  max_steps: 300\n  max_steps: 5"))],
                           ("duplicate key 'max_steps' (first at line", "remove one of them")),
    "duplicate_key_cli_mapping": (lambda t: ["--config", QUICK, "--model.config", "{model_type: gpt2, n_layer: 1, n_layer: 2}"],
                                  "duplicate key 'n_layer'"),
    "config_is_a_directory": (lambda t: ["--config", str(t)], "is a directory; give a YAML file"),
    # item 7
    "model_config_inconsistent_sizes": (lambda t: ["--config", QUICK, *SMALL, "--model.config",
                                                   "{model_type: gpt2, n_layer: 1, n_embd: 30, n_head: 4, n_positions: 64}"],
                                        ("model.config:", "divisible")),
    "lora_r_zero": (lambda t: ["--config", QUICK, *SMALL, "--model.lora", "{r: 0}"], ("model.lora:", "positive")),
    "unknown_model_type": (lambda t: ["--config", QUICK, "--model.config", "{model_type: gtp2, n_layer: 1}"],
                           ("model.config.model_type: unknown model type 'gtp2' (did you mean gpt2",)),
    # item 8
    "train_file_is_a_directory": (lambda t: _data(str(t)), "is a directory; list its files instead"),
    "train_file_empty": (lambda t: _data(_file(t, "zero.txt", "")), "is empty (0 bytes)"),
    "csv_header_only": (lambda t: _data(_file(t, "h.csv", "text\n")), "has a header line but no rows"),
    "jsonl_malformed_line": (lambda t: _data(_file(t, "bad.jsonl", '{"text": "a b c"}\n{"text": "d",}\n{"text": "e"}\n')),
                             ("bad.jsonl line 2 is not valid JSON",)),
    "jsonl_line_not_an_object": (lambda t: _data(_file(t, "arr.jsonl", '{"text": "a b c"}\n["d"]\n')),
                                 "arr.jsonl line 2 is a JSON list, not an object"),
    "validation_file_malformed": (lambda t: _train_and_validation(t, '{oops}\n'),
                                  "data.validation_files: "),
    # item 9
    "model_dir_without_tokenizer": (lambda t: _pretrained(str(_model_dir(t, tokenizer=False))),
                                    "has no tokenizer files"),
    "truncated_safetensors": (lambda t: _pretrained(_truncated_model(t)), ("model.name_or_path: cannot load", "SafetensorError")),
    "pickle_refused_by_weights_only": (lambda t: _pretrained(_pickled_model(t)),
                                       ("model.name_or_path: cannot load", "UnpicklingError")),
    "emo_cost_embedding_not_a_model": (lambda t: ["--config", QUICK, *SMALL, "--objective", "emo", "--emo.cost_embedding",
                                                  str(t)], ("EMO cost_embedding '", "cannot be read")),
    "emo_cost_embedding_truncated_file": (lambda t: ["--config", QUICK, *SMALL, "--objective", "emo",
                                                     "--emo.cost_embedding", _file(t, "c.safetensors", b"\x10\x00\x00")],
                                          ("EMO cost_embedding '", "cannot be read")),
    # item 5
    "output_dir_is_a_file": (lambda t: ["--config", QUICK, "--output_dir", _file(t, "out", "x")],
                             "is a file, not a directory"),
    "output_dir_under_a_file": (lambda t: ["--config", QUICK, "--output_dir", str(Path(_file(t, "f", "x")) / "run")],
                                "is a file; give another --output_dir"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_more_bad_input_is_one_error_line(name, tmp_path, capsys):
    build, expected = CASES[name]
    argv = build(tmp_path)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    for part in [expected] if isinstance(expected, str) else expected:
        assert part in errors[0], errors[0]
    assert "Traceback" not in err and "pwned" not in capsys.readouterr().out


def test_output_dir_not_writable(tmp_path, capsys, monkeypatch):
    """Tests run as root here (permissions do not bite), so the refused write is simulated."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["--config", QUICK, "--output_dir", str(tmp_path / "run")]) == 2
    assert "error: training.output_dir: cannot write in" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_null_text_rows_are_skipped_with_a_count(tmp_path, capsys, caplog):
    rows = ['{"text": null}' if i % 10 == 0 else f'{{"text": "the cat sat on the mat and looked at row {i}"}}' for i in range(100)]
    f = _file(tmp_path, "n.jsonl", "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        assert main([*_data(f), "--output_dir", str(tmp_path / "out")]) == 0, capsys.readouterr().err[-2000:]
    messages = [r.getMessage() for r in caplog.records]
    assert any("10 of 100 rows of the train split have null in column 'text'" in m for m in messages), messages


def test_same_file_for_training_and_validation_warns(tmp_path, caplog):
    f = _file(tmp_path, "t.txt", "\n".join(f"the cat sat on the mat number {i} and then went home" for i in range(60)))
    with caplog.at_level(logging.WARNING):
        assert main([*_data(f), "--output_dir", str(tmp_path / "out")]) == 0
    assert any("is also in data.train_files" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- item 3: the public objective API
@pytest.mark.parametrize("name", ["mle", "emo", "mixce", "mile"])
def test_objective_rejects_mis_shaped_labels(name):
    from emo_trainer.objectives import available, get_objective

    if name not in available():
        pytest.skip(f"{name} not in this build")
    opts = {"cost_embedding": torch.randn(11, 4)} if name == "emo" else {}
    obj = get_objective(name, **opts)
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    assert torch.isfinite(obj(logits, labels).loss)
    bad = {
        "transposed": (labels.reshape(6, 2), "labels have shape (6, 2) but the logits need (2, 6)"),
        "float": (labels.float(), "labels must be integer token ids"),
        "bool": (labels > 5, "labels must be integer token ids"),
        "too_large": (labels.masked_fill(labels == labels[0, 1], 11), "outside [0, 11)"),
        "negative": (labels.masked_fill(labels == labels[0, 1], -1), "outside [0, 11) and != -100"),
    }
    for lab, message in bad.values():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            obj(logits, lab)
    ignored = labels.clone()
    ignored[:, :2] = -100
    assert torch.isfinite(obj(logits, ignored).loss)


def test_chunked_path_rejects_mis_shaped_labels():
    from emo_trainer.objectives import chunked_objective_loss, get_objective

    hidden, weight = torch.randn(2, 6, 4), torch.randn(11, 4)
    labels = torch.randint(0, 11, (2, 6))
    obj = get_objective("mle")
    assert torch.isfinite(chunked_objective_loss(obj, hidden, weight, labels).loss)
    with pytest.raises(ValueError, match="labels have shape"):
        chunked_objective_loss(obj, hidden, weight, labels.reshape(6, 2))
    with pytest.raises(ValueError, match="outside"):
        chunked_objective_loss(obj, hidden, weight, labels + 11)


# --------------------------------------------------------------------------- siblings
def test_misspelt_model_config_key(tmp_path, capsys):
    """transformers keeps ``n_layers`` as an unused attribute (a 12-layer model is built): refused."""
    rc = main(["--config", QUICK, "--model.config", "{model_type: gpt2, n_layers: 1}", "--output_dir", str(tmp_path)])
    assert rc == 2
    assert "error: unknown key 'model.config.n_layers' (did you mean n_layer" in capsys.readouterr().err
    from emo_trainer.config import load_config  # a key the config class converts (rope_theta → rope_parameters) is fine

    load_config(QUICK, ["--model.config", "{model_type: llama, num_hidden_layers: 1, rope_theta: 10000.0}"])


def test_emo_cost_embedding_pickle_refused(tmp_path, capsys):
    import pickle

    f = tmp_path / "cost.pt"
    f.write_bytes(pickle.dumps({"x": _Evil()}))
    rc = main(["--config", QUICK, *SMALL, "--objective", "emo", "--emo.cost_embedding", str(f),
               "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2 and "pwned" not in captured.out
    assert "refuses to run" in captured.err.splitlines()[-1] and "Traceback" not in captured.err


def test_evaluate_script_truncated_weights(tmp_path, capsys):
    from emo_trainer.evaluation import evaluate_cli

    rc = evaluate_cli.main([_truncated_model(tmp_path), "--eval-files", _file(tmp_path, "e.txt", "a b c\n"),
                      "--output", str(tmp_path / "r.json"), "--no-generation"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load a causal LM (SafetensorError" in err and "Traceback" not in err, err[-2000:]


def test_ctrl_c_outside_the_training_loop(tmp_path, capsys, monkeypatch):
    from emo_trainer import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_trainer", interrupted)
    assert main(["--config", QUICK, "--output_dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted outside the training loop" in err and "Traceback" not in err
