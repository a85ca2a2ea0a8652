"""Training-step time and peak memory of every objective × loss path, against transformers' built-in loss.

A benchmark, not a test.  In one run, on one model and one batch, it times a full training step
(forward + loss + backward + AdamW step; warm-up, then the median of ``--steps``) and measures
the step's extra peak memory over the model + optimizer state, for:

  builtin               ``model(input_ids, labels=labels).loss`` (transformers' ForCausalLMLoss): the baseline
  <objective>/full      ``ObjectiveTrainer.compute_loss`` with ``loss_path="full"``
  <objective>/chunked   ``ObjectiveTrainer.compute_loss`` with ``loss_path="chunked"``
  sequencematch+sampling/<path>   online SequenceMatch (``sample_every`` 4): the mean step is the amortised cost
  mle+options/<path>    MLE with ``label_smoothing`` 0.1 and ``z_loss`` 1e-4 (every registered objective,
                        dft, tailr, focal and eaft included, gets its own rows with its defaults)
  reference-emo         the EMO authors' ``EMOLoss`` (PyPI ``EMOLoss``; ``--reference-emo``)
  liger-flce            Liger-Kernel's fused linear cross-entropy (``--liger``; CUDA only)
  torch-lce             PyTorch's chunked ``F.linear_cross_entropy`` (``--torch-lce``, torch ≥ 2.13)
  cce-lce               Cut Cross-Entropy's ``linear_cross_entropy`` (``--cce``; PyPI ``cut-cross-entropy``; CUDA only)
  trl-chunked-nll       TRL's chunked NLL (``--trl``): the fused LM head that ``SFTTrainer`` trains with for
                        ``loss_type="nll"`` (``"chunked_nll"`` is its alias), via the public
                        ``trl.trainer.add_fused_lm_head``; the loss only (no entropy / accuracy metrics)

and reports ratios to the baseline, as a Markdown table and JSON (``--out DIR``).  Third-party
losses are imported only if installed (never a dependency of emo-trainer); a missing one is
skipped with a note.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed steps minus what was
allocated before them (model, AdamW state, data).  On CPU, one extra step is run under
``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum of its
allocations and frees is reported (torch's CPU allocator only; the timed steps are not profiled).

Shapes:
  cpu          tiny GPT-2 (2 layers, d 128, V 8192), batch 4×128, fp32: about a minute on 2 CPU cores
  gpt2         GPT-2-124M (12 layers, d 768, V 50257), batch 8×1024, bf16 autocast (the issue's setting)
  large-vocab  Llama-style, 2 layers, d 2048, V 128256 (Llama-3 vocabulary), batch 4×2048, bf16 autocast;
               ``--max-batch`` also doubles the batch until each loss path runs out of memory (CUDA)

Examples::

    python benchmarks/benchmark.py --shape cpu --out bench/cpu
    python benchmarks/benchmark.py --shape gpt2 --reference-emo --liger --torch-lce --out bench/gpt2
    python benchmarks/benchmark.py --shape gpt2 --compile --objectives mle emo --out bench/gpt2-compile
    python benchmarks/benchmark.py --shape large-vocab --max-batch --out bench/large-vocab
    python benchmarks/benchmark.py --shape gpt2 --liger --cce --trl --out bench/gpt2-peers   # pip install -e ".[bench]"
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "cpu": {"arch": "gpt2", "layers": 2, "hidden": 128, "heads": 4, "vocab": 8192, "batch": 4, "seq": 128,
            "autocast": None, "chunk_size": 128, "steps": 8, "warmup": 2},
    "gpt2": {"arch": "gpt2", "layers": 12, "hidden": 768, "heads": 12, "vocab": 50257, "batch": 8, "seq": 1024,
             "autocast": "bfloat16", "chunk_size": 2048, "steps": 10, "warmup": 3},
    "large-vocab": {"arch": "llama", "layers": 2, "hidden": 2048, "heads": 16, "kv_heads": 8, "intermediate": 8192,
                    "vocab": 128256, "batch": 4, "seq": 2048, "autocast": "bfloat16", "chunk_size": 2048,
                    "steps": 10, "warmup": 3},
}
SM_SAMPLE_EVERY = 4
#: the ``mle+options`` row: MLE with label smoothing and PaLM's z-loss
MLE_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4}


@dataclass
class Case:
    name: str
    kind: str  # builtin | objective | reference-emo | liger | torch-lce | cce | trl
    objective: str | None = None
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    case: str
    objective: str | None
    path: str | None
    status: str = "ok"
    step_ms_median: float | None = None
    step_ms_mean: float | None = None
    step_ms_min: float | None = None
    first_step_ms: float | None = None
    peak_extra_mib: float | None = None
    amortised: bool = False  # time_ratio from the mean (steps with and without sampling), not the median
    time_ratio: float | None = None
    memory_ratio: float | None = None
    note: str = ""


# ---------------------------------------------------------------------- CLI
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/performance.md for the recorded tables.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="model and batch (default: cpu)")
    p.add_argument("--objectives", nargs="+", default=None,
                   help="objectives to run (default: every registered one; 'sequencematch+sampling' for online SM, "
                        "'mle+options' for MLE with label smoothing and z-loss)")
    p.add_argument("--paths", nargs="+", choices=["full", "chunked"], default=["full", "chunked"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per shape)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default: per shape; +3 with --compile)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: per shape)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: per shape)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk on the chunked path (default: per shape)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 autocast with fp32 weights (default: per shape; cpu: fp32)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (1 is steadiest on a shared machine)")
    p.add_argument("--emo-transport-dtype", choices=["float32", "bfloat16"], default=None,
                   help="also run EMO with this transport_dtype (emo[float32]/...) besides the default (auto: "
                        "the logits' dtype, bf16 under bf16 autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile(model) for every case (the loss stays eager)")
    p.add_argument("--reference-emo", action="store_true", help="add the EMO authors' EMOLoss (pip install EMOLoss)")
    p.add_argument("--liger", action="store_true", help="add Liger-Kernel's fused linear cross-entropy (CUDA)")
    p.add_argument("--torch-lce", action="store_true", help="add PyTorch's chunked F.linear_cross_entropy")
    p.add_argument("--cce", action="store_true",
                   help="add Cut Cross-Entropy's linear_cross_entropy (pip install cut-cross-entropy; CUDA)")
    p.add_argument("--trl", action="store_true",
                   help="add TRL's chunked NLL (SFTTrainer's loss_type='nll'/'chunked_nll': trl.trainer.add_fused_lm_head)")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA: double the batch until builtin / mle full / mle chunked run out of memory")
    p.add_argument("--max-batch-limit", type=int, default=256, help="largest batch tried by --max-batch")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more step of each case (torch.profiler; top ops by device "
                        "and by host time) into <out>/profile-<case>.txt — how the cuDNN-attention and odd-"
                        "vocabulary GEMM slowdowns in docs/performance.md were found")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for benchmark.md and benchmark.json")
    return p


# ---------------------------------------------------------------------- model, data
def build_model(shape: dict[str, Any], seq: int) -> torch.nn.Module:
    if shape["arch"] == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=shape["layers"], n_embd=shape["hidden"], n_head=shape["heads"],
                         vocab_size=shape["vocab"], n_positions=max(seq, 1024), bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(seq, 2048),
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def make_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (batch, seq), generator=g)  # the last id stays free for SequenceMatch's <bkspc>
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.clone().to(device)}


def default_cases(args, shape) -> list[Case]:
    from emo_trainer.objectives import available

    names = list(args.objectives or available())
    if not args.objectives and "sequencematch" in names:
        names.append("sequencematch+sampling")
    if not args.objectives and "mle" in names:
        names.insert(names.index("mle") + 1, "mle+options")
    cases = [Case("builtin", "builtin")]
    for name in names:
        objective, options = name, {}
        if name == "sequencematch":
            options = {"sample_every": 0}
        elif name == "sequencematch+sampling":
            objective, options = "sequencematch", {"sample_every": SM_SAMPLE_EVERY}
        elif name == "mle+options":  # label smoothing and z-loss together (docs/objectives.md)
            objective, options = "mle", dict(MLE_OPTIONS)
        for path in args.paths:
            cases.append(Case(f"{name}/{path}", "objective", objective, path, options))
            if objective == "emo" and args.emo_transport_dtype:
                opts = {**options, "transport_dtype": args.emo_transport_dtype}
                cases.append(Case(f"emo[{args.emo_transport_dtype}]/{path}", "objective", "emo", path, opts))
    if args.reference_emo:
        cases.append(Case("reference-emo", "reference-emo", "emo"))
    if args.liger:
        cases.append(Case("liger-flce", "liger", "mle"))
    if args.torch_lce:
        cases.append(Case("torch-lce", "torch-lce", "mle"))
    if getattr(args, "cce", False):
        cases.append(Case("cce-lce", "cce", "mle"))
    if getattr(args, "trl", False):
        cases.append(Case("trl-chunked-nll", "trl", "mle"))
    return cases


class CaseSkipped(Exception):
    """A peer that cannot run here (e.g. a CUDA-only kernel on the CPU): the case is skipped with this note."""


# ---------------------------------------------------------------------- one case
def _trainer(model, objective, options, path, chunk_size, device, tmp):
    from transformers import TrainingArguments

    from emo_trainer.trainer import ObjectiveTrainer

    args = TrainingArguments(output_dir=str(Path(tmp) / "trainer"), report_to="none", save_strategy="no",
                             use_cpu=device.type == "cpu", disable_tqdm=True)
    return ObjectiveTrainer(model=model, args=args, objective=objective, objective_options=options,
                            loss_path=path, chunk_size=chunk_size)


def _prepare_sequencematch(model, vocab):
    # Random weights, no tokenizer: the last vocabulary row plays <bkspc> (its output row set to
    # the mean of the others, as add_backspace_token does); samples run to max_new_tokens.
    model.config.backspace_token_id = vocab - 1
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[-1] = w[:-1].mean(0)


def build_loss(case: Case, model, runner, batch, vocab, chunk_size, device, tmp) -> tuple[Callable[[], torch.Tensor], Any]:
    """A closure computing the case's loss with ``runner`` (the model, compiled or not)."""
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if case.kind == "builtin":
        return lambda: runner(**batch).loss, None
    if case.kind == "objective":
        if case.objective == "sequencematch":
            _prepare_sequencematch(model, vocab)
        trainer = _trainer(model, case.objective, case.options, case.path, chunk_size, device, tmp)
        if case.objective == "sequencematch":
            trainer.objective.eos_token_id = None
        return lambda: trainer.compute_loss(runner, dict(batch), num_items_in_batch=n_items), trainer
    if case.kind == "reference-emo":
        from emo import EMOLoss  # the EMO authors' PyPI package

        cost = model.get_output_embeddings().weight.detach().clone()  # frozen initial head, as in their scripts
        return lambda: EMOLoss(runner(**model_inputs).logits, batch["labels"], cost_embedding=cost, mode=1), None

    if case.kind == "trl":
        # TRL >= 1.16: SFTTrainer patches the model with this fused head and trains on its per-token
        # log-probabilities, computed in chunks without the (batch, seq, vocab) logits.
        from trl.trainer import add_fused_lm_head

        add_fused_lm_head(model)
        labels = batch["labels"]
        return lambda: runner(**model_inputs, labels=labels, fused_lm_head=True).loss, None

    from emo_trainer.trainer import _hidden_states_as_logits

    head = model.get_output_embeddings()
    targets = batch["labels"][:, 1:].reshape(-1)
    if case.kind == "cce":
        from cut_cross_entropy import linear_cross_entropy  # PyPI cut-cross-entropy

        if device.type != "cuda":
            raise CaseSkipped("CUDA only (its kernels are Triton GPU kernels)")

        def loss_of(hidden, weight):
            return linear_cross_entropy(hidden, weight, targets)
    elif case.kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss()

        def loss_of(hidden, weight):
            return fn(weight, hidden, targets)
    else:
        if not hasattr(torch.nn.functional, "linear_cross_entropy"):
            raise ImportError("torch.nn.functional.linear_cross_entropy needs torch >= 2.13")
        options = torch.nn.LinearCrossEntropyOptions()

        def loss_of(hidden, weight):
            return torch.nn.functional.linear_cross_entropy(hidden, weight, targets, options=options)

    def run():
        with _hidden_states_as_logits(model):
            hidden = runner(**model_inputs).logits
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        weight = head.weight
        kind = hidden.device.type
        if torch.is_autocast_enabled(kind):  # run the head in autocast's dtype, as the model would
            dtype = torch.get_autocast_dtype(kind)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            with torch.autocast(kind, enabled=False):
                return loss_of(hidden, weight)
        return loss_of(hidden, weight)

    return run, None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_step(r: Runner, device, out: str | None) -> None:
    """One profiled step of ``r``: the top ops by device time and by host time (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        r.step()
        _sync(device)
    table = prof.key_averages()
    keys = (["cuda_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]
    text = "\n\n".join(f"== {r.case.name}: top ops by {k}\n" + table.table(sort_by=k, row_limit=25, max_name_column_width=70)
                        for k in keys)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"profile-{r.case.name.replace('/', '_')}.txt").write_text(text)
    else:
        print(text, file=sys.stderr)


def _cpu_peak_bytes(step: Callable[[], None]) -> float:
    """Peak of the running sum of torch's CPU allocations and frees during one ``step``.

    Read from the profiler's raw ``[memory]`` records (one per allocation or free, with its time),
    not from per-op totals, which book a free made inside an op only when that op ends.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return float(peak)


@dataclass
class Runner:
    """One case set up and ready to step: its model, optimizer, loss closure and step counter."""

    case: Case
    model: torch.nn.Module
    step: Callable[[], None]
    trainer: Any = None
    result: Result | None = None
    times: list[float] = field(default_factory=list)


def setup_case(case: Case, shape: dict[str, Any], args, device: torch.device, batch_size: int, seq: int,
               tmp: str) -> Runner:
    autocast = shape["autocast"]

    def amp():
        return torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()

    torch.manual_seed(args.seed)
    model = build_model(shape, seq).to(device).train()
    batch = make_batch(shape["vocab"], batch_size, seq, device, args.seed)
    runner = torch.compile(model) if args.compile else model
    loss_fn, trainer = build_loss(case, model, runner, batch, shape["vocab"], args.chunk_size, device, tmp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    objective = trainer.objective if trainer is not None else None
    counter = [0]

    def step():
        if objective is not None:
            objective.on_step_begin(model, counter[0])  # what ObjectiveTrainer's callback does
        with amp():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter[0] += 1

    return Runner(case, model, step, trainer, Result(case.name, case.objective, case.path))


def _timed(r: Runner, device) -> float:
    _sync(device)
    t = time.perf_counter()
    r.step()
    _sync(device)
    return 1e3 * (time.perf_counter() - t)


def _case_steps(case: Case, steps: int) -> int:
    every = case.options.get("sample_every") or 0
    return every * -(-steps // every) if every else steps  # whole sampling periods: the mean is amortised


def _finish(r: Runner) -> Result:
    res = r.result
    res.step_ms_median = statistics.median(r.times)
    res.step_ms_mean = statistics.fmean(r.times)
    res.step_ms_min = min(r.times)
    notes = []
    if r.trainer is not None and getattr(r.trainer, "_warned_chunk_fallback", False):
        notes.append("chunked fell back to full logits")
    if r.case.options.get("sample_every"):
        res.amortised = True
        notes.append(f"samples every {r.case.options['sample_every']} steps: × built-in from the mean (amortised)")
    res.note = "; ".join(notes)
    return res


def measure_cuda(cases, shape, args, device, batch_size, seq, steps, warmup) -> list[Result]:
    """One case at a time: warm-up, timed steps, peak memory over them."""
    results = []
    for case in cases:
        print(f"[benchmark] {case.name} ...", file=sys.stderr, flush=True)
        res = Result(case.name, case.objective, case.path)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                r = setup_case(case, shape, args, device, batch_size, seq, tmp)
                res = r.result
                t0 = time.perf_counter()
                r.step()
                _sync(device)
                res.first_step_ms = 1e3 * (time.perf_counter() - t0)
                for _ in range(max(warmup - 1, 0)):
                    r.step()
                _sync(device)
                gc.collect()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                r.times = [_timed(r, device) for _ in range(_case_steps(case, steps))]
                res.peak_extra_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                if args.profile:
                    _profile_step(r, device, args.out)
                res = _finish(r)
                del r
        except ImportError as e:
            res.status, res.note = "skipped", f"not installed: {e.name or e}"
        except CaseSkipped as e:
            res.status, res.note = "skipped", str(e)
        except torch.cuda.OutOfMemoryError:
            res.status = "OOM"
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            res.status, res.note = "error", f"{type(e).__name__}: {e}"[:200]
        _cleanup(device)
        results.append(res)
    return results


def measure_cpu(cases, shape, args, device, batch_size, seq, steps, warmup) -> list[Result]:
    """All cases set up at once and their steps interleaved, so that a shared CPU's changing load
    hits every case alike; then one profiled step per case for memory."""
    runners, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            res = Result(case.name, case.objective, case.path)
            try:
                r = setup_case(case, shape, args, device, batch_size, seq, tmp)
                t0 = time.perf_counter()
                r.step()
                r.result.first_step_ms = 1e3 * (time.perf_counter() - t0)
                for _ in range(max(warmup - 1, 0)):
                    r.step()
                runners.append(r)
                continue
            except ImportError as e:
                res.status, res.note = "skipped", f"not installed: {e.name or e}"
            except CaseSkipped as e:
                res.status, res.note = "skipped", str(e)
            except Exception as e:  # noqa: BLE001
                res.status, res.note = "error", f"{type(e).__name__}: {e}"[:200]
            results[case.name] = res
        print(f"[benchmark] {len(runners)} cases set up; timing interleaved ...", file=sys.stderr, flush=True)
        for i in range(max(_case_steps(r.case, steps) for r in runners) if runners else 0):
            for r in runners:
                if i < _case_steps(r.case, steps):
                    r.times.append(_timed(r, device))
        for r in runners:
            res = _finish(r)
            if args.profile:
                _profile_step(r, device, args.out)
            try:
                res.peak_extra_mib = _cpu_peak_bytes(r.step) / 2**20
            except Exception as e:  # noqa: BLE001 - keep the timing
                res.note = (res.note + "; " if res.note else "") + f"memory: {type(e).__name__}"
            results[r.case.name] = res
    return [results[c.name] for c in cases]


def run_case_once(case: Case, shape, args, device, batch_size, seq) -> None:
    """One training step (for --max-batch); raises torch.cuda.OutOfMemoryError when it does not fit."""
    with tempfile.TemporaryDirectory() as tmp:
        r = setup_case(case, shape, args, device, batch_size, seq, tmp)
        r.step()
        _sync(device)


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_batch_sweep(shape, args, device, seq) -> list[dict[str, Any]]:
    """Largest batch (doubling) that fits, for the built-in loss and MLE on both paths."""
    out = []
    for case in (Case("builtin", "builtin"), Case("mle/full", "objective", "mle", "full"),
                 Case("mle/chunked", "objective", "mle", "chunked")):
        fits, b = None, args.batch or shape["batch"]
        while b <= args.max_batch_limit:
            try:
                run_case_once(case, shape, args, device, b, seq)
                fits = b
                b *= 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                _cleanup(device)
        out.append({"case": case.name, "max_batch": fits, "oom_at": b if b <= args.max_batch_limit else None,
                    "tokens": None if fits is None else fits * seq})
    return out


# ---------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("emo-trainer", "EMOLoss", "liger-kernel", "cut-cross-entropy", "trl", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            v[dist] = version(dist)
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def render_markdown(meta: dict[str, Any], results: list[Result], sweep: list[dict[str, Any]] | None) -> str:
    mem_how = "CUDA max_memory_allocated" if meta["device_type"] == "cuda" else "torch CPU allocator, torch.profiler"
    lines = [
        f"**Shape `{meta['shape']}`**: {meta['model']}; batch {meta['batch']}×{meta['seq']} "
        f"({meta['batch'] * meta['seq']} tokens), {meta['precision']}; chunk {meta['chunk_size']} tokens"
        + ("; torch.compile(model)" if meta["compile"] else ""),
        f"**Device**: {meta['device']}. **Versions**: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"**Command**: `{meta['command']}`",
        (f"Step = forward + loss + backward + AdamW step; {meta['warmup']} warm-up, median of {meta['steps']}. "
         f"Extra peak memory = peak during the step over model + optimizer state ({mem_how})."),
        "",
        "| case | step ms (median) | mean | × built-in | extra peak MiB | × built-in | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.case} | – | – | – | – | – | {r.status}: {r.note} |")
            continue
        lines.append(
            f"| {r.case} | {_fmt(r.step_ms_median)} | {_fmt(r.step_ms_mean)} | {_fmt(r.time_ratio, '.2f')} | "
            f"{_fmt(r.peak_extra_mib)} | {_fmt(r.memory_ratio, '.2f')} | {r.note} |"
        )
    if sweep:
        lines += ["", "Largest batch that fits (doubling from the shape's batch):", "",
                  "| case | max batch | tokens | OOM at |", "|---|---:|---:|---:|"]
        for s in sweep:
            lines.append(f"| {s['case']} | {_fmt(s['max_batch'], 'd', 'none')} | {_fmt(s['tokens'], 'd')} | "
                         f"{_fmt(s['oom_at'], 'd', '> limit')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    shape = dict(SHAPES[args.shape])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shape != "cpu" and device.type != "cuda":
        print(f"warning: shape '{args.shape}' on {device.type} will be very slow", file=sys.stderr)
    batch_size, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    steps = args.steps or shape["steps"]
    warmup = args.warmup if args.warmup is not None else shape["warmup"] + (3 if args.compile else 0)
    args.chunk_size = args.chunk_size or shape["chunk_size"]
    if args.precision:
        shape["autocast"] = "bfloat16" if args.precision == "bf16" else None
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")

    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    measure = measure_cuda if device.type == "cuda" else measure_cpu
    results = measure(default_cases(args, shape), shape, args, device, batch_size, seq, steps, warmup)
    base = next((r for r in results if r.case == "builtin" and r.status == "ok"), None)
    for r in results:
        if base and r.status == "ok":
            r.time_ratio = (r.step_ms_mean if r.amortised else r.step_ms_median) / base.step_ms_median
            if r.peak_extra_mib is not None and base.peak_extra_mib:
                r.memory_ratio = r.peak_extra_mib / base.peak_extra_mib
    sweep = None
    if args.max_batch:
        sweep = max_batch_sweep(shape, args, device, seq) if device.type == "cuda" else []
    model_desc = (f"{shape['arch']} {shape['layers']} layers, d {shape['hidden']}, V {shape['vocab']}"
                  + (", tied head" if shape["arch"] == "llama" else ""))
    meta = {
        "shape": args.shape, "model": model_desc, "batch": batch_size, "seq": seq, "chunk_size": args.chunk_size,
        "precision": f"{shape['autocast']} autocast, fp32 weights" if shape["autocast"] else "fp32",
        "compile": args.compile, "steps": steps, "warmup": warmup, "device": device_name(device),
        "device_type": device.type, "versions": versions(),
        "command": "python benchmarks/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    md = render_markdown(meta, results, sweep)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.md").write_text(md)
        payload = {"meta": meta, "results": [asdict(r) for r in results], "max_batch": sweep}
        (out / "benchmark.json").write_text(json.dumps(payload, indent=2))
        print(f"wrote {out / 'benchmark.md'} and {out / 'benchmark.json'}", file=sys.stderr)
    return 0

