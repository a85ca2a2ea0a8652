"""SequenceMatch: all states of backspace trajectories from ONE forward pass (tree mask, depth positions).

Each state's logits from the batched tape forward must equal a separate forward over that
state's explicit token list (fp32, 1e-5), for GPT-2 (absolute positions) and a tiny Llama
(rotary), eager and sdpa attention, with noise-augmented data rows, a right-padded row, and
model trajectories that delete several tokens in a row.  States are derived here by
simulating the actions, independently of the tape builder.
"""

from __future__ import annotations

import pytest
import torch

from emo_trainer.backspace_tree import collate_tapes, data_tapes, model_tape

BK = 63  # backspace id inside the tiny vocabulary of 64
EOS = 2


def tiny_model(kind: str, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=EOS,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, bos_token_id=1,
                          eos_token_id=EOS, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model.eval()


# Data rows: (tokens, labels or None, {clean position: wrong token}).
DATA = [
    ([5, 6, 7, 8, 9, EOS], None, {1: 30, 2: 31, 3: 32, 5: 33}),  # noise before consecutive positions
    ([10, 11, 12, 13], [-100, -100, 12, 13], {3: 34}),  # a protected two-token context
]
# Model trajectories: (prompt, actions, terminal).
MODEL = [
    ([5, 6], [20, 21, 22, BK, BK, BK, 23, 24, BK, 25], False),  # three deletions in a row, back to the prompt
    ([7], [40, BK, 41, 42, BK, BK, 43, EOS], True),
]


def explicit_states_data(tokens, labels, noise):
    """(state before each agent action, ..., final state) by simulation."""
    labels = tokens if labels is None else labels
    first = next(j for j in range(1, len(tokens)) if labels[j] != -100)
    state = list(tokens[:first])
    states = []
    for j in range(first, len(tokens)):
        if j in noise:
            states.append(state + [noise[j]])  # the <bkspc> is taken from the noisy state
        states.append(list(state))
        state = state + [tokens[j]]
    return states, state


def explicit_states_model(prompt, actions):
    state, states = list(prompt), []
    for a in actions:
        states.append(list(state))
        state = state[:-1] if a == BK else state + [a]
    return states, state


def build_batch():
    width = max(len(t) for t, _, _ in DATA) + 1  # one padding column: right padding on every row
    ids = torch.zeros((len(DATA), width), dtype=torch.long)
    labels = torch.full((len(DATA), width), -100, dtype=torch.long)
    am = torch.zeros((len(DATA), width), dtype=torch.long)
    for i, (tok, lab, _) in enumerate(DATA):
        ids[i, : len(tok)] = torch.tensor(tok)
        labels[i, : len(tok)] = torch.tensor(lab if lab is not None else tok)
        am[i, : len(tok)] = 1
    tapes = data_tapes(ids, labels, am, backspace_id=BK, eos_token_id=EOS, noise_positions=[n for _, _, n in DATA])
    tapes += [model_tape(p, a, BK, terminal=term) for p, a, term in MODEL]
    return tapes


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_forward_equals_separate_forwards(kind, attn):
    model = tiny_model(kind, attn)
    tapes = build_batch()
    model_inputs, loss_inputs = collate_tapes(tapes, gamma=0.9)
    with torch.no_grad():
        logits = model(**model_inputs).logits
    expected = [explicit_states_data(t, lab, n) for t, lab, n in DATA] + [explicit_states_model(p, a) for p, a, _ in MODEL]
    checked = 0
    for row, (states, final) in enumerate(expected):
        n_act = int(loss_inputs["sm_action_mask"][row].sum())
        assert n_act == len(states)
        nodes = loss_inputs["sm_state"][row, :n_act].tolist()
        last_next = int(loss_inputs["sm_next"][row, n_act - 1])
        pairs = list(zip(nodes, states))
        if last_next >= 0:  # non-terminal: the final state is bootstrapped, so it must be right too
            pairs.append((last_next, final))
        for node, state in pairs:
            # position id = depth of the node in its state
            assert int(model_inputs["position_ids"][row, node]) == len(state) - 1
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([state])).logits[0, -1]
            torch.testing.assert_close(logits[row, node], ref, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked >= 30


def test_next_state_indices_and_backspace_mask():
    tapes = build_batch()
    _, li = collate_tapes(tapes, gamma=0.9)
    # The second model trajectory is terminal: V after its last action (EOS) is 0 (index −1).
    row = len(DATA) + 1
    n_act = int(li["sm_action_mask"][row].sum())
    assert int(li["sm_next"][row, n_act - 1]) == -1
    # First data row ends with EOS: terminal as well; the second is a window: bootstraps.
    assert int(li["sm_next"][0, int(li["sm_action_mask"][0].sum()) - 1]) == -1
    assert int(li["sm_next"][1, int(li["sm_action_mask"][1].sum()) - 1]) >= 0
    # <bkspc> is never allowed at a state with nothing generated.
    for r, (states, _) in enumerate(
        [explicit_states_data(t, lab, n) for t, lab, n in DATA] + [explicit_states_model(p, a) for p, a, _ in MODEL]
    ):
        n_act = len(states)
        protected = 2 if r == 1 else (1 if r == 0 else len(MODEL[r - len(DATA)][0]))
        for i, state in enumerate(states):
            node = int(li["sm_state"][r, i])
            assert bool(li["sm_bk_allowed"][r, node]) == (len(state) > protected)
        assert n_act > 0


def test_padding_rows_never_fully_masked():
    tapes = build_batch()
    mi, _ = collate_tapes(tapes, gamma=0.9)
    visible = mi["attention_mask"][:, 0] == 0
    assert bool(visible.any(-1).all())
    assert bool(visible.diagonal(dim1=-2, dim2=-1).all())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_model_trajectories_see_only_themselves(kind):
    from emo_trainer.backspace_tree import concat_tapes, pack_tapes

    model = tiny_model(kind, "sdpa")
    tapes = [model_tape(p, a, BK, terminal=term) for p, a, term in MODEL]
    packed = concat_tapes(tapes)
    assert packed.num_trajectories == 2 and len(packed) == sum(len(t) for t in tapes)
    mi, li = collate_tapes([packed], gamma=0.9)
    with torch.no_grad():
        logits = model(**mi).logits
    first = 0
    for (prompt, actions, _), tp in zip(MODEL, tapes):
        states, _ = explicit_states_model(prompt, actions)
        for i, state in enumerate(states):
            node = int(li["sm_state"][0, first + i])
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([state])).logits[0, -1]
            torch.testing.assert_close(logits[0, node], ref, atol=1e-5, rtol=1e-5)
        first += tp.num_actions
    # First-fit decreasing: both fit in one row of capacity 40, not in one of 12.
    assert len(pack_tapes(tapes, 40)) == 1 and len(pack_tapes(tapes, 12)) == 2
