"""Training cost of one SequenceMatch step versus one MLE step (CPU or GPU), same model and batch.

    python benchmarks/bench_sequencematch.py                       # defaults: a small GPT-2, V = 8192
    python benchmarks/bench_sequencematch.py --vocab 50258 --layers 4 --embd 256 --batch 8 --seq 128

A step = split_batch + forward + loss + backward + AdamW step, timed after warm-up steps.
Modes:
  mle              the ``mle`` objective on the plain batch
  sm_offline       SequenceMatch, ``sample_every: 0`` (backspace augmentation, tree mask, no ℳ rows)
  sm_no_refill     SequenceMatch online, buffer already full, no refill this step (ℳ rows in the batch)
  sm_refill        SequenceMatch online, ``sample_every: 1`` (the sampling cost paid every step)
The amortised cost for ``sample_every: k`` is sm_no_refill + (sm_refill − sm_no_refill) / k.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(args.seq, args.prefix + args.max_new_tokens) + 1, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).to(args.device)
    model.config.backspace_token_id = args.vocab - 1  # the last row plays <bkspc>
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[-1] = w[:-1].mean(0)
    return model.train()


class Runner:
    """One mode's model, optimizer, objective and batch; ``step()`` times one optimizer step."""

    def __init__(self, mode, args):
        from emo_trainer.objectives import get_objective

        self.mode, self.args, self.count = mode, args, 0
        self.model = build(args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, args.vocab - 1, (args.batch, args.seq), generator=g).to(args.device)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if mode == "mle":
            self.obj = get_objective("mle")
        else:
            self.obj = get_objective(
                "sequencematch", noise_rate=args.noise_rate, sample_every=0 if mode == "sm_offline" else 1,
                buffer_size=4 * args.batch, prefix_tokens=args.prefix, max_new_tokens=args.max_new_tokens,
            )
            self.obj.setup(self.model, None)
            self.obj.eos_token_id = None  # random weights: samples run to max_new_tokens (the worst case)
            if mode == "sm_no_refill":
                self.obj.refill(self.model, ids, None)  # filled once; the timed steps only draw
        self.n_items = self.obj.count_items(self.batch)

    def step(self):
        sync = torch.cuda.synchronize if self.args.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if self.mode == "sm_refill":
            self.obj.on_step_begin(self.model, self.count)  # a refill is due at every step
        mi, li = self.obj.split_batch(self.model, self.batch)
        labels = li.pop("labels")
        out = self.obj(self.model(**mi).logits, labels, self.n_items, **li)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        sync()
        self.count += 1
        return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--noise_rate", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="mle,sm_offline,sm_no_refill,sm_refill")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"GPT-2 {args.layers}L/{args.embd}d, V={args.vocab}, batch {args.batch}x{args.seq}, "
          f"samples: {args.prefix}-token prefix + {args.max_new_tokens} new tokens, noise {args.noise_rate}")
    # Modes run round-robin (one step of each per round) so that load changes on a shared
    # machine hit every mode alike; the first ``warmup`` rounds are not timed.
    runners = [Runner(mode, args) for mode in args.modes.split(",")]
    times = {r.mode: [] for r in runners}
    for rnd in range(args.warmup + args.steps):
        for r in runners:
            t = r.step()
            if rnd >= args.warmup:
                times[r.mode].append(t)
    base = statistics.median(times["mle"]) if "mle" in times else None
    for mode, ts in times.items():
        med = statistics.median(ts)
        ratio = f"  x{med / base:.2f} MLE" if base else ""
        print(f"{mode:>13}: {1000 * med:8.1f} ms/step (median of {len(ts)}; min {1000 * min(ts):.1f}){ratio}")

