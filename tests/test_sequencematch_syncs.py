"""Host↔device synchronisation points of one SequenceMatch training step, counted on CPU.

A CUDA step is host-bound when the CPU keeps waiting for the GPU: every ``.item()`` /
``bool(t)`` / ``int(t)`` / ``float(t)``, ``.tolist()``, ``.cpu()``, ``torch.equal``, ``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without
``output_size``... on a device tensor blocks the host until the GPU has caught up.  On a
CPU-only machine nothing blocks, so :class:`SyncAudit` finds them by *taint*: the tensors that
live on the device in a real run (the collated batch the Trainer moved there, the model's
parameters, what ``split_batch`` sent there) are tagged, every op with a tagged input tags its
outputs (forward and backward, through a ``TorchDispatchMode``), and every sync-inducing call
with a tagged input is recorded with the code line that made it.  Host-side work on host tensors
(augmentation, tape layout) is not counted: that is where it belongs.

The step audited is exactly what ``ObjectiveTrainer.compute_loss`` + ``backward`` does for
offline SequenceMatch with backspace augmentation, plus reading the logged metrics.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_TAG = "_sync_audit_on_device"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# aten ops that make the host wait for the device (their result size or value is read on the host).
_SYNC_ATEN = {
    "_local_scalar_dense",  # .item(), bool(), int(), float(), Python `if t`
    "is_nonzero",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "equal",  # torch.equal returns a Python bool
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
    "histc",
}
# Python-level calls that read device memory on the host without a CPU dispatch of their own.
_SYNC_METHODS = {"cpu", "tolist", "numpy"}


def tag(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as a device tensor (what the audit treats as living on the GPU)."""
    setattr(t, _TAG, True)
    return t


def _tagged(x) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, _TAG, False)


def _where() -> str:
    """The innermost frame of this repository's code (or the caller's), as path:line."""
    frames = [f for f in traceback.extract_stack()[:-3] if "sync_audit" not in f.name]
    # the project's own code: under the repository, but not a virtualenv inside it (CI's .ci-venv)
    ours = [f for f in frames if f.filename.startswith(_REPO) and "/tests/" not in f.filename
            and "site-packages" not in f.filename]
    f = (ours or frames)[-1]
    return f"{os.path.relpath(f.filename, _REPO)}:{f.lineno} ({f.name})"


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        hot = any(_tagged(x) for x in flat)
        name = func.overloadpacket.__name__
        if hot and name in _SYNC_ATEN:
            self.audit._record(f"aten.{name}")
        if hot and name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
            self.audit._record("aten.repeat_interleave (no output_size)")
        if hot and name in ("index", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                self.audit._record(f"aten.{name} with a boolean mask")
        out = func(*args, **kwargs)
        if hot:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    tag(x)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, audit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "synchronize":
            self.audit._record("synchronize()")
        if name in _SYNC_METHODS and args and _tagged(args[0]):
            self.audit._record(f"Tensor.{name}()")
            out = func(*args, **kwargs)
            if name == "cpu":  # a device→host copy: the result is a host tensor (on CPU `.cpu()` aliases)
                with torch._C.DisableTorchFunction():
                    out = out.clone() if out is args[0] else out
                if _tagged(out):
                    delattr(out, _TAG)
            return out
        return func(*args, **kwargs)


class SyncAudit:
    """Context manager recording sync-inducing calls on tagged (device) tensors.

    ``records``: one ``(what, where)`` per call, ``where`` = path:line of this repository's
    innermost frame.  ``summary()``: counts by (what, where).
    """

    def __init__(self):
        self.records: list[tuple[str, str]] = []
        self._modes = []

    def _record(self, what: str) -> None:
        self.records.append((what, _where()))

    def summary(self) -> Counter:
        return Counter(self.records)

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------- setup
VOCAB = 300


@pytest.fixture(scope="module")
def bk_tokenizer():
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    return train_bpe_tokenizer(make_corpus(60, seed=1), vocab_size=VOCAB)


def _trainer(tmp_path, tokenizer, loss_path="full", n_layer=2, **options):
    from conftest import make_tiny_gpt2
    from transformers import TrainingArguments

    from emo_trainer.objectives.sequencematch.backspace import add_backspace_token
    from emo_trainer.trainer import ObjectiveTrainer

    model = make_tiny_gpt2(vocab_size=VOCAB, n_layer=n_layer)
    model.config._attn_implementation = "sdpa"
    tokenizer = copy.deepcopy(tokenizer)
    add_backspace_token(model, tokenizer)
    opts = {"sample_every": 0, "noise_rate": 0.3, "mix": 0.5, "seed": 0, **options}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    return ObjectiveTrainer(model=model, args=args, objective="sequencematch", objective_options=opts,
                            processing_class=tokenizer, loss_path=loss_path, chunk_size=16)


def _batch(rows=3, length=24, seed=0):
    from emo_trainer.data import CausalLMCollator

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (length - 5 * i,), generator=g).tolist() for i in range(rows)]
    return CausalLMCollator(pad_token_id=0)([{"input_ids": s} for s in seqs])


def audit_step(trainer, batch, num_items=None, autocast: torch.dtype | None = None) -> SyncAudit:
    """One training step (split, forward, loss, backward) on device-tagged inputs, audited."""
    model = trainer.model.train()
    for p in model.parameters():
        tag(p)
    batch = {k: tag(v.clone()) if torch.is_tensor(v) else v for k, v in batch.items()}
    if num_items is None:
        num_items = tag(torch.tensor(int((batch["labels"][:, 1:] != -100).sum())))  # as the Trainer passes it
    split = trainer.objective.split_batch

    def split_to_device(m, b):  # what split_batch returns lives on the device
        mi, li = split(m, b)
        return ({k: tag(v) if torch.is_tensor(v) else v for k, v in mi.items()},
                {k: tag(v) if torch.is_tensor(v) else v for k, v in li.items()})

    trainer.objective.split_batch = split_to_device
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
    try:
        with SyncAudit() as audit, ctx:
            loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
            loss.backward()
    finally:
        trainer.objective.split_batch = split
    return audit


def _fmt(audit: SyncAudit) -> str:
    return "\n".join(f"  {n}× {what} at {where}" for (what, where), n in sorted(audit.summary().items()))


# ------------------------------------------------------------------------------------- tests
#: What one SequenceMatch step may still do, and why:
#: - sequencematch.py ``_to_host``: ONE device→host copy of the data batch (ids, padding mask,
#:   labels, position ids stacked), because the backspace augmentation and the tape layout run on
#:   the host.  It comes first, before any of the step's device work is queued.
#: - trainer.py ``compute_loss``: ``torch.isfinite(loss).all()`` in a Python ``if``: the
#:   ``on_nonfinite`` contract (raise, or drop the micro-batch, before its backward) needs the
#:   loss value on the host.
EXPECTED = {
    ("Tensor.cpu()", "_to_host"),
    ("aten._local_scalar_dense", "compute_loss"),
}


def _kinds(audit: SyncAudit) -> set[tuple[str, str]]:
    return {(what, where.rsplit("(", 1)[1].rstrip(")")) for what, where in audit.records}


def test_audit_sees_the_usual_sync_points():
    x = tag(torch.tensor([1.0, -2.0, 3.0]))
    host = torch.tensor([1.0, 2.0])
    with SyncAudit() as audit:
        y = x * 2  # derived tensors are on the device too
        _ = y.sum().item(), bool(y.any()), float(y[0]), int(y[1]), y.tolist(), y.cpu()
        _ = y[y > 0], y.nonzero(), torch.masked_select(y, y > 0), torch.unique(y), torch.equal(y, y)
        _ = torch.repeat_interleave(tag(torch.tensor([1, 2])))
        _ = host.sum().item(), host[host > 1], host.tolist()  # host work: not counted
        z = y.cpu() + 1
        _ = z.tolist()  # a host copy is a host tensor
    what = [w for w, _ in audit.records]
    assert what.count("aten._local_scalar_dense") == 4
    assert what.count("Tensor.cpu()") == 2 and what.count("Tensor.tolist()") == 1
    for name in ("aten.index with a boolean mask", "aten.nonzero", "aten.masked_select", "aten.equal",
                 "aten.repeat_interleave (no output_size)"):
        assert name in what, name
    assert any(w.startswith("aten._unique") for w in what)
    assert len(audit.records) == 13


@pytest.mark.parametrize("loss_path,autocast", [("full", None), ("chunked", None), ("full", torch.bfloat16)])
def test_one_sequencematch_step_syncs_at_most_twice(loss_path, autocast, tmp_path, bk_tokenizer):
    trainer = _trainer(tmp_path, bk_tokenizer, loss_path=loss_path)
    audit = audit_step(trainer, _batch(), autocast=autocast)
    assert _kinds(audit) <= EXPECTED and len(audit.records) <= len(EXPECTED), "\n" + _fmt(audit)
    # The diagnostics stayed on the device; logging reads them as plain floats.
    logged = trainer._metrics["train"]
    assert logged and all(torch.is_tensor(v[-1]) or isinstance(v[-1], float) for v in logged.values())
    from emo_trainer.trainer import _window_means

    means = _window_means(logged)
    assert all(type(v) is float for v in means.values())
    assert means["ce"] == float(logged["ce"][-1])


def test_deferred_metrics_and_loss_equal_the_plain_ones(tmp_path, bk_tokenizer):
    trainer = _trainer(tmp_path, bk_tokenizer)
    model = trainer.model.train()
    mi, li = trainer.objective.split_batch(model, _batch())
    labels = li.pop("labels")
    logits = model(**mi).logits
    obj = trainer.objective
    plain = obj(logits, labels, None, **li)
    obj.defer_metrics = True
    try:
        deferred = obj(logits, labels, None, **li)
    finally:
        obj.defer_metrics = False
    assert torch.equal(plain.loss, deferred.loss) and plain.num_valid == int(deferred.num_valid)
    assert plain.metrics.keys() == deferred.metrics.keys()
    for k, v in plain.metrics.items():
        assert v == float(deferred.metrics[k]), k


def test_tree_mask_is_built_in_the_autocast_dtype_and_gives_the_same_logits(tmp_path, bk_tokenizer):
    trainer = _trainer(tmp_path, bk_tokenizer)
    model = trainer.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mi, _ = trainer.objective.split_batch(model, _batch())
        mask = mi["attention_mask"]
        assert mask.dtype == torch.bfloat16
        assert mask.stride(-2) % 16 == 0 and mask.stride(-1) == 1  # aligned rows (no per-layer padded copy)
        fp32 = {**mi, "attention_mask": torch.where(mask == 0, 0.0, torch.finfo(torch.float32).min)}
        assert torch.equal(model(**mi).logits, model(**fp32).logits)  # what the float32 mask gave
    mi32, _ = trainer.objective.split_batch(model, _batch())
    assert mi32["attention_mask"].dtype == torch.float32  # no autocast: the model's dtype


if __name__ == "__main__":  # audit report: python tests/test_sequencematch_syncs.py
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    tok = train_bpe_tokenizer(make_corpus(60, seed=1), vocab_size=VOCAB)
    for path in ("full", "chunked"):
        with tempfile.TemporaryDirectory() as d:
            tr = _trainer(Path(d), tok, loss_path=path)
            a = audit_step(tr, _batch())
            print(f"{path}: {len(a.records)} sync-inducing calls\n{_fmt(a)}")
