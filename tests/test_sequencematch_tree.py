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

from emo_trainer.objectives.sequencematch.tree import collate_tapes, data_tapes, model_tape

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
    from emo_trainer.objectives.sequencematch.tree import concat_tapes, pack_tapes

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


# ---------------------------------------------------------------------- batched construction
def _reference_row_tape(x, y, bk, rate, noise, pool, eos, generator):
    """The per-row construction the batched :func:`augment_batch` replaced (kept as the reference)."""
    from emo_trainer.objectives.sequencematch.tree import NEVER, Tape

    n = x.numel()
    act = y != -100
    act[0] = False
    idx = torch.arange(n)
    is_noise = (torch.rand(n, generator=generator) < rate) & act if rate > 0 else torch.zeros(n, dtype=torch.bool)
    wrong = noise(x, pool, generator) if bool(is_noise.any()) else torch.zeros(n, dtype=torch.long)
    c = idx + torch.cumsum(is_noise.long(), 0)
    length = n + int(is_noise.sum())
    jn = is_noise.nonzero().squeeze(1)
    nz = c[jn] - 1
    tokens = torch.empty(length, dtype=torch.long)
    depth = torch.empty(length, dtype=torch.long)
    tokens[c], depth[c] = x, idx
    tokens[nz], depth[nz] = wrong[jn], jn
    death = torch.full((length,), NEVER, dtype=torch.long)
    death[nz] = nz + 1
    js = act.nonzero().squeeze(1)
    first = int(js[0]) if js.numel() else n
    clean_target = torch.full((length,), -100, dtype=torch.long)
    clean_target[c[js - 1]] = x[js]
    tok_next = c[js].clone()
    if eos is not None:
        tok_next[x[js] == eos] = -1
    states = torch.cat([c[js - 1], nz])
    actions = torch.cat([x[js], torch.full_like(jn, bk)])
    nexts = torch.cat([tok_next, c[jn - 1]])
    order = torch.argsort(torch.cat([2 * js + 1, 2 * jn]))
    a = order.numel()
    return Tape(tokens=tokens, depth=depth, death=death, bk_allowed=depth >= first, clean_target=clean_target,
                act_state=states[order], act_token=actions[order], act_next=nexts[order], act_time=torch.arange(a),
                act_slot=torch.zeros(a, dtype=torch.long), num_noise=int(jn.numel()))


@pytest.mark.parametrize("mode", ["random", "unigram"])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_batched_augmentation_equals_the_per_row_construction(mode, rate, padding):
    from emo_trainer.objectives.sequencematch.tree import NoiseSampler, augment_batch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, BK, (5, 40), generator=g)
    ids[ids % 11 == 0] = EOS
    am = torch.ones_like(ids)
    for b in range(5):
        if padding == "right":
            am[b, 40 - 6 * b:] = 0
        elif padding == "left":
            am[b, : 6 * b] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[1, :5] = -100  # a protected context: the clean actions start later
    labels[2, 10:14] = -100  # forced tokens inside the row
    noise = NoiseSampler(BK, exclude=[0, 1, EOS, BK], mode=mode)
    kw = {"backspace_id": BK, "noise_rate": rate, "noise": noise, "eos_token_id": EOS}
    tapes = data_tapes(ids, labels, am, generator=torch.Generator().manual_seed(7), **kw)
    ref_gen = torch.Generator().manual_seed(7)
    keep = am.bool()
    pool = ids[keep & (labels != -100)]
    for b, tp in enumerate(tapes):
        ref = _reference_row_tape(ids[b][keep[b]], labels[b][keep[b]], BK, rate, noise, pool, EOS, ref_gen)
        for name in ("tokens", "depth", "death", "bk_allowed", "clean_target", "act_state", "act_token", "act_next",
                     "act_time", "act_slot"):
            assert torch.equal(getattr(tp, name), getattr(ref, name)), (b, name)
        assert tp.num_noise == ref.num_noise
    # The generator ends where the per-row draws leave it: the next draws (replay) do not move.
    assert torch.equal(torch.rand(3, generator=ref_gen), torch.rand(3, generator=torch.Generator().set_state(
        _state_after(ids, labels, am, kw))))

    # collate_tapes(data=...) equals collating the row tapes (with model trajectories after them).
    model = [model_tape(p, a, BK, terminal=term, age=i) for i, (p, a, term) in enumerate(MODEL)]
    rows = augment_batch(ids, labels, am, generator=torch.Generator().manual_seed(7), **kw)
    fast = collate_tapes(model, data=rows, gamma=0.9, pad_token_id=4)
    slow = collate_tapes(rows.tapes() + model, gamma=0.9, pad_token_id=4)
    for d_fast, d_slow in zip(fast, slow):
        assert d_fast.keys() == d_slow.keys()
        for key in d_fast:
            assert d_fast[key].dtype == d_slow[key].dtype and torch.equal(d_fast[key], d_slow[key]), key


def _state_after(ids, labels, am, kw):
    gen = torch.Generator().manual_seed(7)
    data_tapes(ids, labels, am, generator=gen, **kw)
    return gen.get_state()


def test_additive_mask_equals_the_boolean_ancestor_mask():
    from emo_trainer.objectives.sequencematch.tree import NEVER, additive_ancestor_mask, ancestor_mask, concat_tapes

    tapes = build_batch()
    tapes.append(concat_tapes([model_tape(p, a, BK, terminal=term) for p, a, term in MODEL]))
    collate_tapes(tapes, gamma=0.9)
    t = max(len(tp) for tp in tapes)
    death = torch.arange(1, t + 1).repeat(len(tapes), 1)
    for i, tp in enumerate(tapes):
        death[i, : len(tp)] = tp.death
    assert bool((death < NEVER).any()) and bool((death < t).any())
    for dtype in (torch.float32, torch.bfloat16):
        ref = torch.zeros((len(tapes), 1, t, t), dtype=dtype).masked_fill_(~ancestor_mask(death)[:, None],
                                                                          torch.finfo(dtype).min)
        assert torch.equal(additive_ancestor_mask(death, dtype), ref)
    mi, _ = collate_tapes(tapes, gamma=0.9)
    assert torch.equal(mi["attention_mask"], torch.zeros_like(mi["attention_mask"]).masked_fill_(
        ~ancestor_mask(death)[:, None], torch.finfo(torch.float32).min))
