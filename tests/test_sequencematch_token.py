"""SequenceMatch: the <bkspc> action added to a tokenizer + causal LM (init, tying, persistence)."""

from __future__ import annotations

import logging

import pytest
import torch

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.sequencematch.backspace import (
    BACKSPACE_TOKEN,
    add_backspace_token,
    apply_backspaces,
    backspace_token_id,
    strip_backspace_logits,
)


@pytest.fixture
def fresh_tokenizer(tiny_tokenizer, tmp_path):
    """A private copy of the session tokenizer (adding a token must not leak into other tests)."""
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def gpt2(vocab_size):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64)).eval()


def llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def probe_logits(model, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 16), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_add_backspace_token_initial_probability_and_tying(build, fresh_tokenizer):
    vocab = len(fresh_tokenizer)
    model = build(vocab)
    before = probe_logits(model, vocab)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tid = add_backspace_token(model, fresh_tokenizer)
    assert tid == vocab and backspace_token_id(fresh_tokenizer) == tid
    assert model.config.backspace_token_id == tid
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    after = probe_logits(model, vocab)
    # Old columns unchanged; the new logit is the mean logit, so p(<bkspc>) ≤ 1/(V+1) everywhere.
    torch.testing.assert_close(after[..., :vocab], before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after[..., tid], before.mean(-1), atol=1e-5, rtol=1e-5)
    p_bk = after.softmax(-1)[..., tid]
    assert float(p_bk.max()) <= 1.0 / (vocab + 1) + 1e-7
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(head[tid], head[:tid].mean(0))


def test_add_backspace_token_is_idempotent_and_never_reinitialises(fresh_tokenizer):
    model = gpt2(len(fresh_tokenizer))
    tid = add_backspace_token(model, fresh_tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[tid] += 1.0  # "trained"
    trained = model.get_output_embeddings().weight[tid].clone()
    assert add_backspace_token(model, fresh_tokenizer) == tid
    assert len(fresh_tokenizer) == tid + 1
    assert model.get_input_embeddings().weight.shape[0] == tid + 1
    torch.testing.assert_close(model.get_output_embeddings().weight[tid], trained)


def test_save_and_load_keep_the_token(fresh_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = gpt2(len(fresh_tokenizer))
    tid = add_backspace_token(model, fresh_tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[tid] += 0.5
    model.save_pretrained(tmp_path / "ckpt")
    fresh_tokenizer.save_pretrained(tmp_path / "ckpt")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert backspace_token_id(tok2) == tid == model2.config.backspace_token_id
    assert tok2.convert_ids_to_tokens(tid) == BACKSPACE_TOKEN
    assert tok2.encode("a" + BACKSPACE_TOKEN)[-1] == tid
    torch.testing.assert_close(probe_logits(model2, tid), probe_logits(model, tid))
    assert add_backspace_token(model2, tok2) == tid  # loading + setup again: unchanged
    torch.testing.assert_close(model2.get_output_embeddings().weight[tid], model.get_output_embeddings().weight[tid])


def test_padded_vocabulary_reuses_a_spare_row(fresh_tokenizer):
    vocab = len(fresh_tokenizer)
    model = gpt2(vocab + 7)  # e.g. a vocabulary padded to a multiple of 8
    tid = add_backspace_token(model, fresh_tokenizer)
    assert tid == vocab
    assert model.get_input_embeddings().weight.shape[0] == vocab + 7  # no resize
    w = model.get_output_embeddings().weight
    torch.testing.assert_close(w[tid], w[:tid].mean(0))


def test_vocabulary_mismatch_fails_early(fresh_tokenizer):
    with pytest.raises(ValueError, match="do not match"):
        add_backspace_token(gpt2(len(fresh_tokenizer) - 10), fresh_tokenizer)


def test_strip_backspace_logits_renormalises_over_the_original_vocabulary():
    logits = torch.randn(3, 5, 11)
    stripped = strip_backspace_logits(logits, 10)
    torch.testing.assert_close(stripped.log_softmax(-1)[..., :10], logits[..., :10].log_softmax(-1))
    assert torch.isinf(stripped[..., 10]).all() and not torch.isinf(logits).any()
    assert strip_backspace_logits(logits, None) is logits


def test_apply_backspaces():
    assert apply_backspaces([5, 6, 99, 7, 99, 99, 8], 99) == [8]
    with pytest.raises(ValueError, match="protected"):
        apply_backspaces([5, 99, 99], 99)


def test_objective_setup_adds_missing_token_with_a_warning(fresh_tokenizer, caplog):
    model = gpt2(len(fresh_tokenizer))
    obj = get_objective("sequencematch")
    with caplog.at_level(logging.WARNING):
        obj.setup(model, fresh_tokenizer)
    assert "before the optimizer" in caplog.text
    assert obj.backspace_id == len(fresh_tokenizer) - 1 == model.config.backspace_token_id
    assert obj.eos_token_id == fresh_tokenizer.eos_token_id
    caplog.clear()
    obj.setup(model, fresh_tokenizer)  # already there: silent, unchanged
    assert "before the optimizer" not in caplog.text
    logits = torch.randn(2, 3, obj.backspace_id + 1)
    assert torch.isinf(obj.eval_logits_transform(logits)[..., obj.backspace_id]).all()


def test_prepare_model_at_build_time_then_setup_is_silent(fresh_tokenizer, caplog):
    model = gpt2(len(fresh_tokenizer))
    obj = get_objective("sequencematch")
    tid = obj.prepare_model(model, fresh_tokenizer)  # what the CLI calls before the optimizer exists
    with caplog.at_level(logging.WARNING):
        obj.setup(model, fresh_tokenizer)  # what ObjectiveTrainer calls
    assert "before the optimizer" not in caplog.text
    assert tid == obj.backspace_id == model.config.backspace_token_id
    assert obj.generation_sampler.__name__ == "sample_continuations_with_backspace"
