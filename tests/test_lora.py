"""LoRA calibration on a tiny Llama: EMO through build_trainer, adapters only, base-head cost, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def _merge_script():
    from emo_trainer import lora

    return lora


@pytest.fixture
def llama_run(tmp_path, tiny_tokenizer):
    """A tiny random Llama + its tokenizer saved as a 'pretrained' checkpoint, and a text corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from emo_trainer.quickstart_corpus import make_corpus

    base = tmp_path / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64,
                      bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(base))
    tiny_tokenizer.save_pretrained(str(base))
    docs = make_corpus(80, seed=3)
    (tmp_path / "train.txt").write_text("\n".join(docs[:70]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(docs[70:]) + "\n")
    return tmp_path, base


def _config(tmp_path, base):
    from emo_trainer.config import build_config

    return build_config({
        "model": {"name_or_path": str(base),
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_files": [str(tmp_path / "train.txt")], "validation_files": [str(tmp_path / "valid.txt")],
                 "block_size": 32, "calibration_sentences": 60, "calibration_min_words": 3},
        "objective": {"name": "emo", "emo": {"mode": 2, "cost_embedding": "initial"}},
        "eval": {"generation": False},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                     "learning_rate": 5e-2, "report_to": "none", "save_strategy": "no", "use_cpu": True,
                     "seed": 0, "logging_steps": 1},
    })


def test_lora_emo_adapters_only_base_cost_and_merge(llama_run):
    from transformers import AutoModelForCausalLM

    from emo_trainer.cli import build_trainer
    from emo_trainer.objectives.emo import normalise_rows

    tmp_path, base = llama_run
    trainer, _ = build_trainer(_config(tmp_path, base))
    model = trainer.model
    assert hasattr(model, "get_base_model"), "model.lora should give a PeftModel"
    base_head = AutoModelForCausalLM.from_pretrained(str(base)).lm_head.weight.detach().float()
    # EMO's `initial` cost embedding is the frozen base model's head.
    torch.testing.assert_close(trainer.objective.cost_embedding, normalise_rows(base_head))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter changed in training"
    assert all("lora_" in n for n in changed), f"non-adapter parameters changed: {sorted(changed)[:3]}"
    assert any("lora_B" in n for n in changed)
    # the cost embedding did not follow training
    torch.testing.assert_close(trainer.objective.cost_embedding, normalise_rows(base_head))
    assert (tmp_path / "run" / "calibration_set.txt").is_file()

    final = tmp_path / "run" / "final"
    trainer.save_model(str(final))
    assert (final / "adapter_config.json").is_file()
    merged_dir = _merge_script().merge(final, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not hasattr(merged, "peft_config")
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, want), "the adapter should have changed the model"
    assert (merged_dir / "tokenizer_config.json").is_file()


def test_merge_lora_rejects_a_non_adapter_dir(tmp_path, capsys):
    assert _merge_script().main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_merge_finds_a_relative_base_from_elsewhere_and_keeps_the_backspace_action(llama_run, monkeypatch):
    """A SequenceMatch LoRA run: the merged checkpoint records backspace_token_id (else reloading it
    for more training re-initialises the action's row); the adapter's base path, relative to where
    training ran, is found from another working directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emo_trainer.objectives.sequencematch.backspace import add_backspace_token

    tmp_path, _ = llama_run
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained("./base")  # recorded relative, as a run records a relative --model path
    tok = AutoTokenizer.from_pretrained("./base")
    bk = add_backspace_token(model, tok)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "runs" / "sm" / "final"
    peft_model.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"
    elsewhere = tmp_path / "runs" / "sm"
    monkeypatch.chdir(elsewhere)  # ./base does not exist from here
    script = _merge_script()
    assert script.main(["final", "merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(elsewhere / "merged"))
    assert merged.config.backspace_token_id == bk
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(script.MergeError, match="pass --base"):
        script._base_of(Path("/nonexistent/run/final"), "../not-there")
