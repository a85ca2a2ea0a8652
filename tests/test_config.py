"""Config: YAML + overrides, and a clear error naming the key for every bad input."""

from __future__ import annotations

import pytest

from emo_trainer.config import ConfigError, load_config

BASE = """
model:
  config: {model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}
  train_tokenizer_vocab_size: 300
data:
  dataset: builtin:quickstart
  block_size: 32
objective:
  name: emo
  emo: {mode: 1, ratio_cap: 3.0}
  mixce: {eta: 0.3}
training:
  output_dir: /tmp/x
  learning_rate: 5.0e-5
"""


@pytest.fixture
def base_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(BASE)
    return p


def test_yaml_loads_and_types(base_yaml):
    cfg = load_config(base_yaml)
    assert cfg.objective.name == "emo"
    assert cfg.objective.selected_options() == {"mode": 1, "ratio_cap": 3.0}
    assert cfg.training["learning_rate"] == 5e-5
    assert cfg.data.block_size == 32
    args = cfg.training_arguments()
    assert args.learning_rate == 5e-5


def test_overrides_all_forms(base_yaml):
    cfg = load_config(
        base_yaml,
        ["--objective", "mixce", "--learning_rate", "3e-5", "--mixce.eta", "0.7", "--data.block_size", "16",
         "eval.num_prompts=60", "--emo.mode=2", "--bf16", "false"],
    )
    assert cfg.objective.name == "mixce"
    assert cfg.objective.selected_options() == {"eta": 0.7}
    assert cfg.objective.options["emo"]["mode"] == 2
    assert cfg.training["learning_rate"] == pytest.approx(3e-5)
    assert cfg.training["bf16"] is False
    assert cfg.data.block_size == 16
    assert cfg.eval.num_prompts == 60


def test_resolved_config_round_trips(base_yaml, tmp_path):
    cfg = load_config(base_yaml, ["--emo.mode", "2"])
    saved = cfg.save(tmp_path / "resolved.yaml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--objective", "nope"], "unknown objective 'nope'"),
        (["--learning_rat", "1e-3"], "unknown key '--learning_rat'"),
        (["--data.blocksize", "3"], "unknown key 'data.blocksize'"),
        (["--data.block_size", "abc"], "data.block_size: expected an integer"),
        (["--learning_rate", "-1"], "training.learning_rate: must be a positive number"),
        (["--mixce.eta", "1.5"], "objective.mixce"),
        (["--emo.mdoe", "2"], "unknown key 'objective.emo.mdoe'"),
        (["--emo.mode", "x"], "objective.emo.mode"),
        (["--objective.loss_path", "sideways"], "objective.loss_path: must be one of"),
        (["--bogus.key", "1"], "'bogus' is not a section"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_values_name_the_key(base_yaml, overrides, needle):
    if overrides[:2] == ["--mixce.eta", "1.5"]:
        overrides = ["--objective", "mixce", *overrides]
    with pytest.raises(ConfigError) as e:
        load_config(base_yaml, overrides)
    assert needle in str(e.value)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  data: 3")
    with pytest.raises(ConfigError, match="malformed YAML .* line"):
        load_config(bad)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(BASE + "\nmodle: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'.*did you mean model"):
        load_config(p)
