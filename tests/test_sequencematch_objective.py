"""SequenceMatch objective: augmentation, replay buffer, schedule, offline/online training, state."""

from __future__ import annotations

import math

import pytest
import torch

from emo_trainer.objectives import ObjectiveError, get_objective, objective_options
from emo_trainer.objectives.sequencematch.replay import ModelTrajectory, ReplayBuffer
from emo_trainer.objectives.sequencematch.tree import NoiseSampler, data_tapes

V = 64
BK = 63
EOS = 2
SPECIAL = [0, 1, EOS]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=EOS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.config.backspace_token_id = BK
    return model


def make(**kw):
    opts = {"noise_rate": 0.1, "sample_every": 2, "buffer_size": 6, "prefix_tokens": 4, "max_new_tokens": 6}
    opts.update(kw)
    obj = get_objective("sequencematch", **opts)
    obj.backspace_id, obj.eos_token_id, obj.pad_token_id = BK, EOS, 0
    obj.noise = NoiseSampler(BK, exclude=[*SPECIAL, BK], mode=obj.noise_token)
    return obj


def batch(rows=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, BK, (rows, length), generator=g)
    am = torch.ones_like(ids)
    am[-1, length - 3:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}


# ---------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("mode", ["random", "unigram"])
def test_noise_rate_is_respected_and_noise_is_wrong_and_not_special(mode):
    rate = 0.2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (32, 64), generator=g)  # a narrow vocabulary makes "wrong ≠ true" bite
    noise = NoiseSampler(BK, exclude=[*SPECIAL, BK], mode=mode)
    tapes = data_tapes(ids, None, None, backspace_id=BK, noise_rate=rate, noise=noise, generator=g)
    n_actions = 32 * 63
    n_noise = sum(t.num_noise for t in tapes)
    sigma = math.sqrt(n_actions * rate * (1 - rate))
    assert abs(n_noise - rate * n_actions) < 4 * sigma
    for tp, row in zip(tapes, ids):
        noisy = (tp.death < 2**62).nonzero().squeeze(1)  # noise nodes are the deleted ones
        assert noisy.numel() == tp.num_noise == int((tp.act_token == BK).sum())
        clean_next = tp.tokens[noisy + 1]  # the true token typed right after the deletion
        assert bool((tp.tokens[noisy] != clean_next).all())
        assert not set(tp.tokens[noisy].tolist()) & {*SPECIAL, BK}
        if mode == "unigram":
            assert set(tp.tokens[noisy].tolist()) <= set(ids.flatten().tolist())
        # A noise token is never an action: only <bkspc> is taken from its node, and the
        # clean actions are exactly the row's tokens.
        assert bool((tp.act_token[torch.isin(tp.act_state, noisy)] == BK).all())
        assert tp.act_token[tp.act_token != BK].tolist() == row[1:].tolist()


def test_labels_must_match_input_ids():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="labels equal to input_ids"):
        data_tapes(ids, torch.tensor([[5, 9, 7]]), None, backspace_id=BK)


# ---------------------------------------------------------------------------- buffer
def test_replay_buffer_is_fifo_with_ages_and_state():
    buf = ReplayBuffer(3)
    buf.push([ModelTrajectory([1], [5 + i], False, step=i) for i in range(5)])
    assert [t.step for t in buf.items()] == [2, 3, 4]  # oldest evicted first
    assert buf.mean_age(10) == pytest.approx(7.0)
    drawn = buf.draw(5, torch.Generator().manual_seed(0))
    assert len(drawn) == 3 and len({id(t) for t in drawn}) == 3
    other = ReplayBuffer(3)
    other.load_state_dict(buf.state_dict())
    assert other.items() == buf.items()
    with pytest.raises(ValueError):
        ReplayBuffer(0)


# ---------------------------------------------------------------------------- schedule
def test_warmup_is_exactly_mle_then_sequencematch():
    model = tiny_gpt2().train()
    obj = make(bc_warmup_steps=2, sample_every=0)
    mle = get_objective("mle")
    b = batch()
    for step in (0, 1):
        obj.on_step_begin(model, step)
        mi, li = obj.split_batch(model, b)
        assert set(mi) == {"input_ids", "attention_mask"} and mi["input_ids"] is b["input_ids"]
        logits = model(**mi).logits
        out = obj(logits, li["labels"], None)
        ref = mle(logits, b["labels"], None)
        assert float(out.loss.detach()) == float(ref.loss.detach())
        g1 = torch.autograd.grad(out.loss, logits)[0]
        g2 = torch.autograd.grad(ref.loss, logits)[0]
        assert torch.equal(g1, g2)
    obj.on_step_begin(model, 2)
    mi, li = obj.split_batch(model, b)
    assert mi["attention_mask"].dim() == 4 and "sm_state" in li
    # Eval mode always gets the plain batch.
    model.eval()
    mi, _ = obj.split_batch(model, b)
    assert mi["attention_mask"].dim() == 2


def test_count_items_is_the_targets_trained_on_with_left_padding():
    """A left-padded row's first token is context for SequenceMatch (augmentation and warm-up
    alike): num_items_in_batch must count exactly the targets the loss sums over."""
    from emo_trainer.objectives import shift_labels

    model = tiny_gpt2().train()
    ids = torch.tensor([[0, 0, 3, 5, 8, 9], [4, 6, 7, 9, 3, 5], [4, 6, 7, 9, 0, 0]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    b = {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}
    obj = make(bc_warmup_steps=1, sample_every=0, noise_rate=0.0)
    assert int(obj.count_items(b)) == 3 + 5 + 3  # the base count would be 4 + 5 + 3
    for step in (0, 1):  # warm-up (plain MLE), then SequenceMatch
        obj.on_step_begin(model, step)
        _, li = obj.split_batch(model, b)
        assert int((shift_labels(li["labels"]) != -100).sum()) == int(obj.count_items(b))


def test_refill_cadence_and_buffer_age():
    model = tiny_gpt2().train()
    obj = make(bc_warmup_steps=1, sample_every=2, buffer_size=100)
    sizes = []
    for step in range(6):
        obj.on_step_begin(model, step)
        mi, li = obj.split_batch(model, batch(seed=step))
        sizes.append(len(obj.buffer))
        if step >= 1:
            out = obj(model(**mi).logits, li.pop("labels"), None, **li)
            assert math.isfinite(float(out.loss))
            assert out.metrics["sm_model_rows"] == 3.0
            ages = li["sm_age"][li["sm_age"] >= 0]  # per model action
            assert out.metrics["sm_buffer_age"] == pytest.approx(float(ages.float().mean()))
            assert 0 <= int(ages.max()) <= step - 1
            for k in ("sm_v", "sm_reward_data", "sm_reward_model", "sm_bk_rate_samples", "sm_buffer_size"):
                assert k in out.metrics
    # No sampling during warm-up; refills at steps 1, 3, 5 (3 prompts each).
    assert sizes == [0, 3, 3, 6, 6, 9]


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("sample_every", [0, 1])
def test_a_few_training_steps_offline_and_online(sample_every):
    model = tiny_gpt2().train()
    obj = make(sample_every=sample_every, mix=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = batch(rows=4, length=16)
    n_items = obj.count_items(b)
    assert int(n_items) == int((b["labels"][:, 1:] != -100).sum())
    losses = []
    for step in range(4):
        obj.on_step_begin(model, step)
        mi, li = obj.split_batch(model, b)
        assert bool(li["sm_is_model"].any()) == (sample_every > 0)
        labels = li.pop("labels")
        assert int((labels[:, 1:] != -100).sum()) == int(n_items)  # the count the trainer normalises by
        out = obj(model(**mi).logits, labels, n_items, **li)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
        assert out.metrics["sm_lambda"] == (0.5 if sample_every else 1.0)
    assert all(math.isfinite(x) for x in losses)
    assert len(obj.buffer) == (0 if sample_every == 0 else min(6, 4 * 4))


@pytest.mark.parametrize("sample_every", [0, 1])
def test_padding_rows_to_a_multiple_changes_shapes_not_the_loss(sample_every):
    model = tiny_gpt2().train()
    results = {}
    for multiple in (1, 24):
        obj = make(sample_every=sample_every, pad_to_multiple_of=multiple)
        torch.manual_seed(0)
        for step in range(2):  # step 1 draws from the buffer the first refill filled
            obj.on_step_begin(model, step)
            mi, li = obj.split_batch(model, batch(rows=3, length=13, seed=step))
        t = mi["input_ids"].shape[1]
        assert t % multiple == 0 and mi["attention_mask"].shape[-2:] == (t, t)
        out = obj(model(**mi).logits, li.pop("labels"), None, **li)
        model.zero_grad()
        out.loss.backward()
        results[multiple] = (t, out.loss.detach(), [p.grad.clone() for p in model.parameters()], out.metrics)
    (t1, l1, g1, m1), (t16, l16, g16, m16) = results[1], results[24]
    assert t1 % 24 != 0 and t16 > t1  # the draw does need padding, so the test can fail
    torch.testing.assert_close(l16, l1, rtol=1e-6, atol=1e-7)
    for a, b in zip(g16, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for k in ("sm_v", "sm_reward_data", "sm_bk_rate_data"):
        assert m16[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7)


def test_state_dict_round_trip_reproduces_the_next_batch():
    model = tiny_gpt2().train()
    obj = make(sample_every=3)
    for step in range(2):
        obj.on_step_begin(model, step)
        obj.split_batch(model, batch(seed=step))
    state = obj.state_dict()
    twin = make(sample_every=3)
    twin.load_state_dict(state)
    assert [t.actions for t in twin.buffer.items()] == [t.actions for t in obj.buffer.items()]
    for o in (obj, twin):
        o.on_step_begin(model, 2)
    mi1, li1 = obj.split_batch(model, batch(seed=9))
    mi2, li2 = twin.split_batch(model, batch(seed=9))
    assert torch.equal(mi1["input_ids"], mi2["input_ids"]) and torch.equal(li1["sm_age"], li2["sm_age"])
    # ... including the next refill's samples (the sampling RNG is part of the state).
    for o in (obj, twin):
        o.on_step_begin(model, 3)
        o.split_batch(model, batch(seed=10))
    assert [t.actions for t in twin.buffer.items()] == [t.actions for t in obj.buffer.items()]


# ---------------------------------------------------------------------------- options
def test_options_are_documented_and_validated():
    opts = objective_options("sequencematch")
    for name in ("gamma", "chi2_coef", "lam", "mix", "bc_warmup_steps", "noise_rate", "noise_token", "sample_every",
                 "buffer_size", "max_actions", "terminal_mode"):
        assert name in opts
        assert f"{name}:" in get_objective("sequencematch").__class__.__doc__
    defaults = get_objective("sequencematch").options()
    assert defaults["gamma"] == 0.998 and defaults["chi2_coef"] == 0.0025 and defaults["lam"] == 0.5
    assert defaults["max_actions"] == 2 * defaults["max_new_tokens"]
    for bad in ({"gamma": 0.0}, {"lam": 1.5}, {"noise_token": "model"}, {"terminal_mode": "always"}, {"mix": -1},
                {"pad_to_multiple_of": 0}):
        with pytest.raises(ObjectiveError):
            get_objective("sequencematch", **bad)
    with pytest.raises(ObjectiveError, match="unknown option"):
        get_objective("sequencematch", alpha=0.01)


def test_flash_attention_is_refused():
    model = tiny_gpt2()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention masks"):
        get_objective("sequencematch").setup(model, None)


# ---------------------------------------------------------------------------- several processes
def _ddp_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_gpt2().train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        obj = make(sample_every=1, noise_rate=0.3)
        obj.average_tokens_across_devices = True
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):
            b = batch(rows=2 + rank, length=10 + 3 * rank, seed=100 * rank + step)  # ragged: shapes differ by rank
            n_items = obj.count_items(b).clone()
            dist.all_reduce(n_items)
            obj.on_step_begin(model, step)
            mi, li = obj.split_batch(ddp, b)  # the trainer hands over the wrapped model
            labels = li.pop("labels")
            out = obj(ddp(**mi).logits, labels, n_items, **li)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        torch.save({"params": [p.detach() for p in model.parameters()],
                    "prompts": [t.prompt for t in obj.buffer.items()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_several_processes_sample_their_share_and_stay_in_sync(tmp_path, free_port):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b)  # gradients were all-reduced although the ranks' tapes differ
    # Each process sampled continuations of its own rows (a refill per step, one per row).
    for rank, res in enumerate((r0, r1)):
        rows = [r for step in range(2) for r in batch(rows=2 + rank, length=10 + 3 * rank, seed=100 * rank + step)
                ["input_ids"].tolist()]
        assert len(res["prompts"]) == 2 * (2 + rank)
        assert all(any(r[: len(p)] == p for r in rows) for p in res["prompts"])
