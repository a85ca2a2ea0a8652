"""Worker of ``tests/test_distributed.py``: a few optimizer steps of every objective, data parallel
and fully sharded, dumping per-step losses and final weights.

Launched by the test as::

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
        tests/dist_worker.py OUT_DIR --per_device 2

(two gloo processes on CPU: ``TrainingArguments(use_cpu=True)``), and called in-process with
``world = 1`` and the doubled per-device batch for the reference.  One launch covers every
objective (process start-up dominates the cost on a small CPU machine).

On a GPU machine (docs/distributed.md), the same check with ``--gpu`` (NCCL)::

    python tests/dist_worker.py /tmp/one --per_device 4 --gpu
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 tests/dist_worker.py /tmp/two --gpu
    python tests/dist_worker.py --compare /tmp/one /tmp/two

Two phases:

* ``ddp``: :class:`~emo_trainer.trainer.ObjectiveTrainer` on each case of :data:`CASES`, with
  gradient accumulation 2 and ragged rows, so that ranks hold different numbers of target
  tokens — the case ``num_items_in_batch`` (gathered over ranks) and the world-size factor are
  for.  Rank 0 writes the logged per-step ``loss`` and ``grad_norm`` and the final weights.
* ``fsdp2``: the same objectives on a model sharded with ``torch.distributed.fsdp.fully_shard``
  (FSDP2 runs on CPU with gloo; accelerate itself never selects FSDP on a CPU, see
  docs/distributed.md), driven by a plain training loop: the lm_head weight is a sharded
  DTensor between steps, EMO ``initial`` is read before sharding and ``live`` gathers it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emo_trainer.evaluation.sharding import release_process_group

VOCAB = 300
ROWS = 24  # ragged training rows; 3 optimizer steps of 8 rows
LENGTHS = [5, 17, 9, 30, 12, 3, 25, 8, 21, 14, 6, 28, 11, 19, 4, 16]
STEPS = 3
ACCUM = 2

#: name → (objective, options, data kind).  "fixed" = equal-length rows (SequenceMatch normalises
#: each micro-batch by its own Σγ^t, which is the global one only when rows look alike).
CASES: dict[str, tuple[str, dict, str]] = {
    "mle": ("mle", {}, "ragged"),
    "emo_initial": ("emo", {"cost_embedding": "initial", "mode": 1}, "ragged"),
    "emo_live": ("emo", {"cost_embedding": "live", "mode": 2}, "ragged"),
    "mixce": ("mixce", {"eta": 0.1}, "ragged"),  # on the chunked loss path under DDP
    "mile": ("mile", {"gamma": 1.0}, "ragged"),
    "sequencematch_offline": ("sequencematch", {"sample_every": 0, "noise_rate": 0.0, "mix": 0.5}, "fixed"),
    # Online: each process samples its share with its own seed; compared loosely (see the test).
    "sequencematch_online": (
        "sequencematch",
        {"sample_every": 2, "noise_rate": 0.1, "mix": 0.5, "max_new_tokens": 6, "prefix_tokens": 4,
         "sample_batch_size": 8, "buffer_size": 16},
        "fixed",
    ),
    # the ecosystem's token-weighted objectives (issue 17); focal has MiLe's cross-rank α
    "dft": ("dft", {}, "ragged"),
    "tailr": ("tailr", {"gamma": 0.3, "min_weight": 0.05}, "ragged"),  # chunked
    "focal": ("focal", {"gamma": 2.0}, "ragged"),
    "eaft": ("eaft", {"alpha": 1.0, "top_k": 20}, "ragged"),  # chunked
    "mle_options": ("mle", {"label_smoothing": 0.1, "z_loss": 1e-3}, "ragged"),
}
#: Cases of the DDP phase (EMO `live` runs in the FSDP phase, where gathering its head matters).
DDP_CASES = ("mle", "emo_initial", "mixce", "mile", "sequencematch_offline", "sequencematch_online",
             "dft", "tailr", "focal", "eaft", "mle_options")
CHUNKED = {"mixce", "tailr", "eaft"}
#: Set by ``--gpu``: the same cases on CUDA (NCCL) for the GPU check in docs/distributed.md.
USE_GPU = False

# Tolerances of the comparison (see tests/test_distributed.py for why these values).
LOSS_ATOL = 1e-5
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 5e-4
ONLINE_SM_LOSS_ATOL = 0.05
FSDP_CASES = ("emo_initial", "emo_live", "mixce", "mile")


def make_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def make_rows(kind: str, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(ROWS)] if kind == "ragged" else [16] * ROWS
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def make_tokenizer():
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    return train_bpe_tokenizer(make_corpus(60, seed=1), vocab_size=VOCAB)


def run_ddp_case(name: str, out_dir: Path, per_device: int) -> dict:
    import datasets
    from transformers import TrainingArguments

    from emo_trainer.data import CausalLMCollator
    from emo_trainer.objectives import get_objective
    from emo_trainer.trainer import ObjectiveTrainer

    objective_name, options, kind = CASES[name]
    model = make_model()
    tokenizer = None
    objective = get_objective(objective_name, **options)
    if objective_name == "sequencematch":
        from emo_trainer.objectives.sequencematch.backspace import add_backspace_token

        tokenizer = make_tokenizer()
        add_backspace_token(model, tokenizer)
    args = TrainingArguments(
        output_dir=str(out_dir / name), per_device_train_batch_size=per_device, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not USE_GPU, seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = ObjectiveTrainer(
        model=model, args=args, objective=objective, loss_path="chunked" if name in CHUNKED else "full",
        chunk_size=16, train_dataset=datasets.Dataset.from_dict({"input_ids": make_rows(kind)}),
        data_collator=CausalLMCollator(pad_token_id=0), processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "loss": [h["loss"] for h in logs],
        "grad_norm": [h["grad_norm"] for h in logs],
        "steps": trainer.state.global_step,
    }
    if objective_name == "sequencematch":
        sizes = [len(objective.buffer)]
        if args.world_size > 1:
            sizes = [None] * args.world_size
            torch.distributed.all_gather_object(sizes, len(objective.buffer))
        result["buffer_size_per_rank"] = sizes
        result["sm_model_rows"] = [h.get("sm_model_rows", 0.0) for h in logs]
    if args.process_index == 0:
        save_weights(trainer.accelerator.unwrap_model(trainer.model), out_dir / f"{name}.safetensors")
    return result


def run_skip_case(out_dir: Path, per_device: int) -> dict:
    """MiLe with on_nonfinite="skip" where only the LAST process gets a non-finite first micro-batch:
    the step's α all-reduce must still be joined by every process (a process whose micro-batches
    were all skipped contributes zeros), so the run finishes instead of hanging."""
    import datasets
    from transformers import TrainingArguments

    from emo_trainer.data import CausalLMCollator
    from emo_trainer.objectives.mile import MileObjective
    from emo_trainer.trainer import ObjectiveTrainer

    class PoisonedOnLastRank(MileObjective):
        calls = 0

        def token_stats(self, logits, targets, extras=None):
            stats = super().token_stats(logits, targets, extras)
            self.calls += 1
            dist = torch.distributed
            last = dist.is_initialized() and dist.get_rank() == dist.get_world_size() - 1 and dist.get_world_size() > 1
            if last and self.calls == 1:
                stats["ce"] = stats["ce"] + float("nan")
            return stats

    args = TrainingArguments(
        output_dir=str(out_dir / "skip"), per_device_train_batch_size=per_device, gradient_accumulation_steps=1,
        max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not USE_GPU, seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = ObjectiveTrainer(
        model=make_model(), args=args, objective=PoisonedOnLastRank(gamma=1.0), on_nonfinite="skip",
        train_dataset=datasets.Dataset.from_dict({"input_ids": make_rows("ragged")}),
        data_collator=CausalLMCollator(pad_token_id=0),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "loss": [h["loss"] for h in logs],
            "skipped": [h.get("skipped_batches", 0) for h in logs]}


EVAL_ROWS = 7  # ragged eval rows: with 2 processes × 2 per device the last batch repeats a sample


def run_eval_case(out_dir: Path, per_device: int) -> dict:
    """``evaluate()`` of an MLE-trained-for-nothing model on ragged rows: eval loss and token count."""
    import datasets
    from transformers import TrainingArguments

    from emo_trainer.data import CausalLMCollator
    from emo_trainer.trainer import ObjectiveTrainer

    args = TrainingArguments(output_dir=str(out_dir / "eval"), per_device_eval_batch_size=per_device,
                             report_to="none", use_cpu=not USE_GPU, disable_tqdm=True)
    rows = make_rows("ragged", seed=3)[:EVAL_ROWS]
    trainer = ObjectiveTrainer(model=make_model(), args=args, objective="mile",
                               eval_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                               data_collator=CausalLMCollator(pad_token_id=0))
    metrics = trainer.evaluate()
    return {"eval_loss": metrics["eval_loss"], "eval_tokens": metrics["eval_tokens"],
            "eval_perplexity": metrics["eval_perplexity"]}


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    # named_parameters() lists a tied weight once; safetensors refuses shared storage.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.named_parameters()}, str(path))


# --------------------------------------------------------------------------- FSDP2
def run_fsdp_case(name: str, out_dir: Path, rank: int, world: int) -> dict:
    """Three AdamW steps on a fixed global batch of 8 ragged rows, each rank holding 8/world rows."""
    from emo_trainer.data import CausalLMCollator
    from emo_trainer.objectives import get_objective
    from emo_trainer.objectives.base import IGNORE_INDEX
    from emo_trainer.trainer import ObjectiveTrainer

    objective_name, options, _ = CASES[name]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if USE_GPU else torch.device("cpu")
    model = make_model().to(device)
    objective = get_objective(objective_name, **options)
    objective.average_tokens_across_devices = True
    objective.setup(model)  # what ObjectiveTrainer.__init__ does: before accelerate shards the model
    result: dict = {}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        head = model.get_output_embeddings().weight
        result["head_is_dtensor"] = hasattr(head, "_local_tensor")
        result["head_local_rows"] = int(head._local_tensor.shape[0]) if hasattr(head, "_local_tensor") else -1
        fake_trainer = types.SimpleNamespace(_unwrapped=lambda m: m, is_fsdp_enabled=False)
        result["chunked_supported"] = ObjectiveTrainer._chunked_supported(fake_trainer, model)
        if objective_name == "emo":
            # setup() on the sharded model gathers the DTensor: the same matrix as before sharding.
            again = get_objective(objective_name, **options)
            again.setup(model)
            result["cost_setup_sharded_maxdiff"] = float((again.cost_embedding - objective.cost_embedding).abs().max())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rows = make_rows("ragged", seed=1)[:8]
    per = len(rows) // world
    collate = CausalLMCollator(pad_token_id=0)
    full = collate([{"input_ids": r} for r in rows])
    n_items = int((full["labels"][:, 1:] != IGNORE_INDEX).sum())
    local = {k: v.to(device) for k, v in collate([{"input_ids": r} for r in rows[rank * per : (rank + 1) * per]]).items()}
    losses = []
    for step in range(3):
        objective.on_step_begin(model, step)
        logits = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
        out = objective(logits, local["labels"], num_items_in_batch=n_items)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    result["loss"] = losses
    weights = {}
    for k, p in model.named_parameters():
        t = p.detach()
        weights[k] = t.full_tensor() if hasattr(t, "full_tensor") else t
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.cpu().clone().contiguous() for k, v in weights.items()}, str(out_dir / f"fsdp2_{name}.safetensors"))
    return result


def run_all(out_dir: str | os.PathLike, per_device: int, cases=None, fsdp_cases=None) -> dict:
    """Every case; returns (and on rank 0 writes ``results.json``) ``{"ddp": ..., "fsdp2": ...}``."""
    from emo_trainer.objectives import available

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in (cases or DDP_CASES) if CASES[n][0] in available()]
    results: dict = {"ddp": {}, "fsdp2": {}}
    for name in names:
        results["ddp"][name] = run_ddp_case(name, out, per_device)
    results["eval"] = run_eval_case(out, per_device)
    results["skip"] = run_skip_case(out, per_device)
    # The Trainer's accelerate state has initialised the process group (gloo) by now.
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    results["world"] = world
    for name in [n for n in (fsdp_cases or FSDP_CASES) if CASES[n][0] in available()]:
        results["fsdp2"][name] = run_fsdp_case(name, out, rank, world)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def compare(one_dir: str | os.PathLike, two_dir: str | os.PathLike) -> list[str]:
    """Differences between a 1-process and a 2-process run beyond the tolerances (empty = equal)."""
    from safetensors.torch import load_file

    one_dir, two_dir = Path(one_dir), Path(two_dir)
    one = json.loads((one_dir / "results.json").read_text())
    two = json.loads((two_dir / "results.json").read_text())
    problems = [] if two["world"] == 2 else [f"the 2-process run had world size {two['world']}"]
    for phase, prefix in (("ddp", ""), ("fsdp2", "fsdp2_")):
        for name, a in one[phase].items():
            b = two[phase][name]
            dl = max(abs(x - y) for x, y in zip(a["loss"], b["loss"]))
            if name == "sequencematch_online":
                ok = dl <= ONLINE_SM_LOSS_ATOL and all(n > 0 for n in b["buffer_size_per_rank"])
                print(f"{phase:5s} {name:24s} loss |Δ| {dl:.2e} (sampling differs by design) {'ok' if ok else 'FAIL'}")
                problems += [] if ok else [f"{phase} {name}"]
                continue
            dg = max((abs(x - y) / abs(x) for x, y in zip(a.get("grad_norm", []), b.get("grad_norm", []))), default=0.0)
            wa, wb = load_file(str(one_dir / f"{prefix}{name}.safetensors")), load_file(str(two_dir / f"{prefix}{name}.safetensors"))
            dw = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
            ok = dl <= LOSS_ATOL and dg <= GRAD_NORM_RTOL and dw <= WEIGHT_ATOL
            print(f"{phase:5s} {name:24s} loss |Δ| {dl:.2e}  grad-norm rel {dg:.2e}  weights |Δ| {dw:.2e}  {'ok' if ok else 'FAIL'}")
            problems += [] if ok else [f"{phase} {name}"]
    return problems


def main() -> None:
    global USE_GPU
    p = argparse.ArgumentParser()
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--per_device", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="run on CUDA (NCCL) instead of CPU (gloo)")
    p.add_argument("--compare", nargs=2, metavar=("ONE_DIR", "TWO_DIR"), help="compare two finished runs and exit")
    a = p.parse_args()
    if a.compare:
        sys.exit(1 if compare(*a.compare) else 0)
    USE_GPU = a.gpu
    run_all(a.out_dir, a.per_device)
    release_process_group()


if __name__ == "__main__":
    main()
