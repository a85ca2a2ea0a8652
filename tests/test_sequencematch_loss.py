"""SequenceMatch-χ² loss against a float64 reference written here from the formula (value + gradient).

The hand-built batch holds data trajectories (noise + backspace, a protected context, one
terminal EOS ending, one window ending) and model trajectories (consecutive deletions, a
terminal and a non-terminal ending).  Logits are a function of the *explicit state*: a
float64 table keyed by (row, state tuple).  The reference walks every trajectory by
simulation and applies

    Q = z(s)[a],  V(s) = logsumexp over allowed actions (<bkspc> only if s holds a generated token),
    V' = V(s') or 0 after a terminal action,  r = Q − γV',  w = γ^t,
    L_SM = [−Σ_𝒟 w r + λΣ_𝒟 w(V − γV') + cλΣ_𝒟 w r²]/W_𝒟 + (1−λ)[Σ_ℳ w(V − γV') + cΣ_ℳ w r²]/W_ℳ,
    L = (1 − β)·mean CE(clean tokens) + β·L_SM.
"""

from __future__ import annotations

import math

import pytest
import torch

from emo_trainer.objectives import chunked_objective_loss, get_objective
from emo_trainer.objectives.sequencematch.tree import collate_tapes, data_tapes, model_tape

V = 40
BK = 39
EOS = 2

DATA = [
    # tokens, labels (None = tokens), {position: wrong token}
    ([5, 6, 7, 8, EOS], None, {2: 9, 4: 10}),
    ([11, 12, 13, 14], [-100, -100, 13, 14], {3: 15}),
]
MODEL = [
    ([5, 6], [20, 21, BK, BK, 22, EOS], True),
    ([11], [23, BK, 24, 25, BK], False),
]


def make_objective(**kw):
    opts = {"gamma": 0.9, "chi2_coef": 0.3, "lam": 0.4, "mix": 0.7, "noise_rate": 0.0, "sample_every": 0}
    opts.update(kw)
    obj = get_objective("sequencematch", **opts)
    obj.backspace_id, obj.eos_token_id = BK, EOS
    return obj


def build(with_model=True):
    width = max(len(t) for t, _, _ in DATA)
    ids = torch.zeros((len(DATA), width), dtype=torch.long)
    lab = torch.full_like(ids, -100)
    am = torch.zeros_like(ids)
    for i, (t, lb, _) in enumerate(DATA):
        ids[i, : len(t)], lab[i, : len(t)], am[i, : len(t)] = torch.tensor(t), torch.tensor(lb or t), 1
    tapes = data_tapes(ids, lab, am, backspace_id=BK, eos_token_id=EOS, noise_positions=[n for _, _, n in DATA])
    if with_model:
        tapes += [model_tape(p, a, BK, terminal=term) for p, a, term in MODEL]
    return tapes


def trajectories(with_model=True):
    """Explicit (state, action, next_state or None, protected length, is_model, clean) lists."""
    out = []
    for t, lb, noise in DATA:
        lb = lb or t
        first = next(j for j in range(1, len(t)) if lb[j] != -100)
        state, steps = tuple(t[:first]), []
        for j in range(first, len(t)):
            if j in noise:
                noisy = state + (noise[j],)  # environment noise: no term
                steps.append((noisy, BK, state, False))
            nxt = state + (t[j],)
            steps.append((state, t[j], None if t[j] == EOS else nxt, True))
            state = nxt
        out.append((steps, first, False))
    if with_model:
        for p, acts, term in MODEL:
            state, steps = tuple(p), []
            for i, a in enumerate(acts):
                nxt = state[:-1] if a == BK else state + (a,)
                steps.append((state, a, None if (term and i == len(acts) - 1) else nxt, False))
                state = nxt
            out.append((steps, len(p), True))
    return out


def state_of(model_inputs, b, p):
    vis = model_inputs["attention_mask"][b, 0, p] == 0
    return tuple(model_inputs["input_ids"][b][vis].tolist())


def reference(table, trajs, gamma, c, lam, mix):
    sums = {False: [0.0, 0.0], True: [0.0, 0.0]}  # is_model -> [S, W]
    ce_sum, n_clean = 0.0, 0
    has_model = any(m for _, _, m in trajs)
    lam_eff = lam if has_model else 1.0

    def value(b, s, protected):
        z = table[(b, s)]
        return torch.logsumexp(z if len(s) > protected else z[:BK], 0)

    for b, (steps, protected, is_model) in enumerate(trajs):
        for t, (s, a, nxt, clean) in enumerate(steps):
            z = table[(b, s)]
            if clean:
                ce_sum = ce_sum - torch.log_softmax(z, 0)[a]
                n_clean += 1
            vn = 0.0 if nxt is None else value(b, nxt, protected)
            r = z[a] - gamma * vn
            dv = value(b, s, protected) - gamma * vn
            w = gamma**t
            if is_model:
                term = (1 - lam_eff) * dv + c * (1 - lam_eff) * r * r
            else:
                term = -r + lam_eff * dv + c * lam_eff * r * r
            sums[is_model][0] = sums[is_model][0] + w * term
            sums[is_model][1] += w
    l_sm = sums[False][0] / sums[False][1] + (sums[True][0] / sums[True][1] if has_model else 0.0)
    return (1 - mix) * ce_sum / n_clean + mix * l_sm


def logits_from_table(model_inputs, table):
    """fp32 logits (B, T, V) of the tape, each position filled from its explicit state."""
    b, t = model_inputs["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(b, t, V, generator=g)  # padding positions: anything
    keys = {}
    for i in range(b):
        for p in range(t):
            key = (i, state_of(model_inputs, i, p))
            if key in table:
                logits[i, p] = table[key].detach().float()
                keys[key] = p
    return logits.requires_grad_(True), keys


def random_table(trajs):
    g = torch.Generator().manual_seed(0)
    table = {}
    for b, (steps, _, _) in enumerate(trajs):
        for s, _, nxt, _ in steps:
            for st in (s, nxt):
                if st is not None and (b, st) not in table:
                    table[(b, st)] = (2.0 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    return table


@pytest.mark.parametrize("with_model", [True, False])
def test_loss_value_and_gradient_match_float64_reference(with_model):
    obj = make_objective()
    mi, li = collate_tapes(build(with_model), gamma=obj.gamma)
    trajs = trajectories(with_model)
    table = random_table(trajs)
    logits, keys = logits_from_table(mi, table)
    assert set(keys) == set(table), "every explicit state must be a node of the tape"
    labels = li.pop("labels")
    out = obj(logits, labels, None, **li)
    ref = reference(table, trajs, obj.gamma, obj.chi2_coef, obj.lam, obj.mix)
    assert math.isclose(float(out.loss), float(ref), rel_tol=1e-5, abs_tol=1e-5)
    assert out.metrics["sm_lambda"] == (obj.lam if with_model else 1.0)

    out.loss.backward()
    ref.backward()
    for key, p in keys.items():
        b, _ = key
        torch.testing.assert_close(logits.grad[b, p].double(), table[key].grad, atol=2e-6, rtol=1e-4)
    # Positions that are no state of any trajectory get no gradient.
    used = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for (b, _), p in keys.items():
        used[b, p] = True
    assert float(logits.grad[~used].abs().max()) == 0.0


def test_noise_token_is_not_a_data_action():
    obj = make_objective()
    mi, li = collate_tapes(build(False), gamma=obj.gamma)
    # The wrong tokens (9, 10, 15) are on the tape but never an action of the loss.
    acts = li["sm_actions"][li["sm_actions"] >= 0].tolist()
    assert not {9, 10, 15} & set(acts)
    assert {9, 10, 15} <= set(mi["input_ids"].flatten().tolist())
    assert acts.count(BK) == 3


def test_num_items_reduction_and_gradient_accumulation():
    obj = make_objective()
    # Two micro-batches of equal-length rows without noise: W/n is the same, GA is exact.
    rows = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, EOS], [3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    tapes = data_tapes(rows, None, None, backspace_id=BK, eos_token_id=EOS)
    g = torch.Generator().manual_seed(3)
    _, full_li = collate_tapes(tapes, gamma=obj.gamma)
    logits = torch.randn(4, 5, V, generator=g)
    labels = full_li.pop("labels")
    big = obj(logits, labels, None, **full_li).loss
    n_total = int((labels != -100).sum())
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        _, li = collate_tapes(tapes[sl], gamma=obj.gamma)
        lab = li.pop("labels")
        parts.append(obj(logits[sl], lab, torch.tensor(n_total), **li).loss)
    assert math.isclose(float(sum(parts)), float(big), rel_tol=1e-6)
    # One micro-batch: num_items_in_batch = its own count gives the plain (per-batch) value.
    one = obj(logits, labels, torch.tensor(n_total), **full_li).loss
    assert math.isclose(float(one), float(big), rel_tol=1e-6)


def test_mix_zero_is_mle_on_clean_tokens():
    obj = make_objective(mix=0.0)
    mi, li = collate_tapes(build(True), gamma=obj.gamma)
    trajs = trajectories(True)
    table = random_table(trajs)
    logits, _ = logits_from_table(mi, table)
    labels = li.pop("labels")
    sm = obj(logits, labels, None, **li).loss
    ce = torch.stack([-torch.log_softmax(table[(b, s)], 0)[a] for b, (steps, _, _) in enumerate(trajs)
                      for s, a, _, clean in steps if clean]).mean()
    assert math.isclose(float(sm), float(ce), rel_tol=1e-6)


def test_chunked_path_matches_full_logits():
    obj = make_objective()
    mi, li = collate_tapes(build(True), gamma=obj.gamma)
    torch.manual_seed(0)
    b, t = mi["input_ids"].shape
    hidden = torch.randn(b, t, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    labels = li.pop("labels")
    full = obj(hidden @ weight.T, labels, None, **li)
    gh, gw = torch.autograd.grad(full.loss, (hidden, weight))
    chunked = chunked_objective_loss(obj, hidden, weight, labels, None, chunk_size=7, **li)
    ch, cw = torch.autograd.grad(chunked.loss, (hidden, weight))
    assert math.isclose(float(full.loss), float(chunked.loss), rel_tol=1e-5)
    torch.testing.assert_close(gh, ch, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, cw, atol=1e-5, rtol=1e-4)
    assert full.metrics.keys() == chunked.metrics.keys()


def test_end_to_end_tree_forward_loss_matches_float64_separate_forwards():
    """Tiny GPT-2: loss from the one tape forward (fp32) = reference from per-state forwards (fp64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=EOS)
    model = GPT2LMHeadModel(cfg)
    ref_model = GPT2LMHeadModel(cfg).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    obj = make_objective()
    mi, li = collate_tapes(build(True), gamma=obj.gamma)
    labels = li.pop("labels")
    loss = obj(model(**mi).logits, labels, None, **li).loss
    trajs = trajectories(True)
    states = {(b, st) for b, (steps, _, _) in enumerate(trajs) for s, _, nxt, _ in steps for st in (s, nxt) if st}
    table = {key: ref_model(input_ids=torch.tensor([key[1]])).logits[0, -1] for key in states}
    ref = reference(table, trajs, obj.gamma, obj.chi2_coef, obj.lam, obj.mix)
    assert math.isclose(float(loss), float(ref), rel_tol=1e-5)
    loss.backward()
    ref.backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_params[name].grad, atol=2e-5, rtol=1e-3)


def test_policy_stats_match_plain_autograd_and_gradcheck():
    from emo_trainer.objectives.sequencematch import policy_stats

    g = torch.Generator().manual_seed(0)
    n, vocab, bk = 7, 11, 10
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    logits[0, bk] = 40.0  # <bkspc> dominates a row where it is masked: V must ignore it stably
    logits[1, bk] = 30.0  # ... and a row where it is allowed
    logits[3, bk] = 2.5  # a masked <bkspc> with a sizeable share (p < 1/2)
    targets = torch.randint(0, bk, (n,), generator=g)
    actions = torch.tensor([[1, -1], [bk, 3], [4, 4], [-1, -1], [2, bk], [0, 5], [9, -1]])
    allowed = torch.tensor([False, True, True, False, True, False, True])
    leaf = logits.clone().requires_grad_(True)
    ce, v, q = policy_stats(leaf, targets, actions, allowed, bk, block_elements=3 * vocab)  # several blocks
    masked = torch.where(allowed[:, None] | (torch.arange(vocab) != bk), leaf, torch.tensor(float("-inf")))
    ref_ce = torch.logsumexp(leaf, -1) - leaf.gather(1, targets[:, None]).squeeze(1)
    ref_v = torch.logsumexp(masked, -1)
    ref_q = leaf.gather(1, actions.clamp_min(0)) * (actions >= 0)
    torch.testing.assert_close((ce, v, q), (ref_ce, ref_v, ref_q))
    w = torch.randn(3, n, generator=g, dtype=torch.float64)
    wq = torch.randn(n, 2, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad((w[0] * ce + w[1] * v).sum() + (wq * q).sum(), leaf)
    (b,) = torch.autograd.grad((w[0] * ref_ce + w[1] * ref_v).sum() + (wq * ref_q).sum(), leaf)
    torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda z: policy_stats(z, targets, actions, allowed, bk, block_elements=2 * vocab), (leaf,)
    )


def test_packing_model_rows_does_not_change_the_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    from emo_trainer.objectives.sequencematch.tree import pack_tapes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    obj = make_objective()
    data = build(False)
    sampled = [model_tape(p, a, BK, terminal=term, age=3) for p, a, term in MODEL]
    results = []
    for tapes in (data + sampled, data + pack_tapes(sampled, capacity=64)):
        mi, li = collate_tapes(tapes, gamma=obj.gamma)
        labels = li.pop("labels")
        out = obj(model(**mi).logits, labels, None, **li)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out, grads, mi["input_ids"].shape[0]))
    (a, ga, rows_a), (b, gb, rows_b) = results
    assert rows_b == rows_a - 1
    assert math.isclose(float(a.loss), float(b.loss), rel_tol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert a.metrics["sm_model_rows"] == b.metrics["sm_model_rows"] == 2
    assert a.metrics["sm_buffer_age"] == b.metrics["sm_buffer_age"] == 3


def _policy_reference(z, targets, actions, allowed, bk):
    masked = torch.where(allowed[:, None] | (torch.arange(z.shape[1]) != bk), z, torch.tensor(float("-inf"), dtype=z.dtype))
    ce = torch.logsumexp(z, -1) - z.gather(1, targets[:, None]).squeeze(1)
    return ce, torch.logsumexp(masked, -1), z.gather(1, actions.clamp_min(0)) * (actions >= 0)


@pytest.mark.parametrize("bk", [0, 6, 12])  # first, middle and last column
def test_policy_stats_low_precision_logits_fp32_math_and_no_fp32_copy(bk):
    """bf16 logits: statistics in fp32 of the bf16 values, the gradient in bf16, and autograd keeps
    the logits themselves (no fp32 N×V copy); stable when a masked <bkspc> holds all the mass."""
    from emo_trainer.objectives.sequencematch import policy_stats

    g = torch.Generator().manual_seed(1)
    n, vocab = 9, 13
    z64 = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    z64[0, bk] = 120.0  # masked <bkspc> with all the mass: exp(z_bk − V) overflows fp32
    z64[1, bk] = 120.0  # ... allowed
    z64[2, bk] = -1e4  # never chosen
    logits = z64.to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[3] = bk
    actions = torch.randint(-1, vocab, (n, 3), generator=g)
    actions[4] = torch.tensor([bk, bk, targets[4]])
    allowed = torch.rand(n, generator=g) < 0.5
    allowed[0], allowed[1] = False, True
    ref_in = logits.double().requires_grad_(True)
    ref = _policy_reference(ref_in, targets, actions, allowed, bk)
    w = torch.randn(2, n, generator=g, dtype=torch.float64)
    wq = torch.randn(n, 3, generator=g, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((w[0] * ref[0] + w[1] * ref[1]).sum() + (wq * ref[2]).sum(), ref_in)

    leaf = logits.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = policy_stats(leaf, targets, actions, allowed, bk, block_elements=4 * vocab)
    assert all(o.dtype == torch.float32 for o in out)
    big = [t for t in saved if t.dim() == 2 and t.shape[-1] == vocab]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == leaf.data_ptr()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(
        (w[0].float() * out[0] + w[1].float() * out[1]).sum() + (wq.float() * out[2]).sum(), leaf)
    assert grad.dtype == torch.bfloat16 and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, ref_grad.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def test_policy_stats_under_autocast_matches_fp32_on_the_same_values():
    from emo_trainer.objectives.sequencematch import policy_stats

    g = torch.Generator().manual_seed(2)
    n, vocab, bk = 6, 10, 9
    logits = torch.randn(n, vocab, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, bk, (n,), generator=g)
    actions = torch.randint(0, vocab, (n, 2), generator=g)
    allowed = torch.tensor([True, False] * 3)
    plain = policy_stats(logits.float(), targets, actions, allowed, bk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = policy_stats(logits, targets, actions, allowed, bk)
    for a, b in zip(amp, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
