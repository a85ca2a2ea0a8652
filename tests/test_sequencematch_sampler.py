"""SequenceMatch: backspace-aware sampling (KV tape rollback, deletions applied, action cap)."""

from __future__ import annotations

import pytest
import torch

from emo_trainer.objectives.sequencematch.backspace import apply_backspaces
from emo_trainer.objectives.sequencematch.sampler import generate_with_backspace

BK = 63
EOS = 2


def tiny_model(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                          bos_token_id=1, eos_token_id=EOS)).eval()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=EOS, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def boost(token, amount):
    def processor(logits):
        logits = logits.clone()
        logits[:, token] += amount
        return logits

    return processor


PROMPTS = [[5, 6, 7], [8], [9, 10]]


def left_padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], am[i, width - len(p):] = torch.tensor(p), 1
    return ids, am


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_step_logits_equal_separate_forwards_and_deletions_are_applied(kind):
    model = tiny_model(kind)
    ids, am = left_padded(PROMPTS)
    g = torch.Generator().manual_seed(0)
    out = generate_with_backspace(
        model, ids, am, backspace_token_id=BK, max_new_tokens=6, max_actions=14, eos_token_id=EOS,
        generator=g, logits_processor=boost(BK, 4.0), return_step_logits=True,
    )
    n_bk = 0
    for i, prompt in enumerate(PROMPTS):
        acts = out.actions[i]
        assert 0 < len(acts) <= 14
        state = list(prompt)
        for k, a in enumerate(acts):
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([state])).logits[0, -1]
            torch.testing.assert_close(out.step_logits[i][k], ref, atol=1e-5, rtol=1e-5)
            if a == BK:
                assert len(state) > len(prompt), "deleted into the prompt"
                state = state[:-1]
                n_bk += 1
            else:
                state = state + [a]
        assert out.continuations[i] == state[len(prompt):] == apply_backspaces(acts, BK)
        assert out.sequences[i, ids.shape[1]: ids.shape[1] + len(state) - len(prompt)].tolist() == state[len(prompt):]
        assert out.terminal[i] == (acts[-1] == EOS)
        assert out.num_backspaces[i] == acts.count(BK)
    assert n_bk >= 3, "the boost should produce several backspaces, consecutive ones included"


def test_backspace_never_deletes_the_prompt_and_actions_are_capped():
    model = tiny_model("gpt2")
    ids, am = left_padded(PROMPTS)
    out = generate_with_backspace(
        model, ids, am, backspace_token_id=BK, max_new_tokens=5, max_actions=9, eos_token_id=None,
        generator=torch.Generator().manual_seed(1), logits_processor=boost(BK, 50.0),
    )
    # With <bkspc> almost certain whenever allowed, every row alternates type / delete until the cap.
    for acts, cont in zip(out.actions, out.continuations):
        assert len(acts) == 9
        assert acts[0] != BK and all(acts[k] == BK for k in range(1, 9, 2))
        assert cont == apply_backspaces(acts, BK) and len(cont) == 1
    assert out.backspace_rate == pytest.approx(4 / 9)


def test_length_stop_eos_stop_and_greedy_padding_invariance():
    model = tiny_model("llama")
    ids, am = left_padded(PROMPTS)
    no_bk = boost(BK, -100.0)
    out = generate_with_backspace(model, ids, am, backspace_token_id=BK, max_new_tokens=4, eos_token_id=None,
                                  do_sample=False, logits_processor=no_bk)
    assert all(len(c) == 4 for c in out.continuations) and not any(out.terminal)
    # Right padding gives the same greedy actions as left padding.
    width = ids.shape[1]
    rids = torch.zeros_like(ids)
    ram = torch.zeros_like(am)
    for i, p in enumerate(PROMPTS):
        rids[i, : len(p)], ram[i, : len(p)] = torch.tensor(p), 1
    out_r = generate_with_backspace(model, rids, ram, backspace_token_id=BK, max_new_tokens=4, do_sample=False,
                                    logits_processor=no_bk)
    assert out_r.actions == out.actions and width == rids.shape[1]
    # ... and with backspaces in play (sampling, same seed).
    kw = {"backspace_token_id": BK, "max_new_tokens": 4, "logits_processor": boost(BK, 3.0)}
    out_l = generate_with_backspace(model, ids, am, generator=torch.Generator().manual_seed(5), **kw)
    out_r = generate_with_backspace(model, rids, ram, generator=torch.Generator().manual_seed(5), **kw)
    assert out_r.actions == out_l.actions and sum(out_l.num_backspaces) > 0
    # EOS made certain: every row stops after one action, terminal.
    out_e = generate_with_backspace(model, ids, am, backspace_token_id=BK, max_new_tokens=4, eos_token_id=EOS,
                                    logits_processor=boost(EOS, 100.0))
    assert out_e.actions == [[EOS]] * 3 and all(out_e.terminal)


def test_text_helpers(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from emo_trainer.evaluation.config import EvalConfig
    from emo_trainer.objectives.sequencematch.backspace import add_backspace_token
    from emo_trainer.objectives.sequencematch.sampler import generate_text, sample_continuations_with_backspace

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)).eval()
    add_backspace_token(model, tok)
    texts = generate_text(model, tok, ["The cat", "A much longer prompt here"], max_new_tokens=5,
                          generator=torch.Generator().manual_seed(0))
    assert len(texts) == 2 and all(isinstance(t, str) and "<bkspc>" not in t for t in texts)
    torch.manual_seed(0)
    cfg = EvalConfig(max_new_tokens=5, batch_size=1)
    texts2 = sample_continuations_with_backspace(model, tok, ["The cat", "Another"], cfg, seed=0)
    assert len(texts2) == 2 and all("<bkspc>" not in t for t in texts2)


def test_samples_fit_the_model_context():
    from emo_trainer.objectives.sequencematch.replay import sample_trajectories

    model = tiny_model("gpt2")  # 64 positions
    prompts = [list(range(3, 50)), [5, 6]]  # 47 tokens: 47 + 64 new tokens would overflow
    trajs, _ = sample_trajectories(model, prompts, backspace_token_id=BK, step=0, max_new_tokens=64,
                                   generator=torch.Generator().manual_seed(0))
    for t in trajs:
        assert len(t.prompt) + len(apply_backspaces(t.actions, BK)) <= 64
    ids, am = left_padded([list(range(3, 50))])
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate_with_backspace(model, ids, am, backspace_token_id=BK, max_new_tokens=64)
