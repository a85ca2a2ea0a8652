"""Two processes equal one process with the doubled batch, for every objective (DDP and FSDP2, CPU, gloo).

One ``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2`` runs
``tests/dist_worker.py`` (every case in one launch: process start-up dominates on a small
machine); the reference is the same worker called in this process with world size 1 and
twice the per-device batch.  Note ``accelerate launch --cpu --num_processes 2`` starts ONE
process unless mpirun is configured (huggingface/accelerate#2741); the DDP config goes through
``torch.distributed.run`` and ``TrainingArguments(use_cpu=True)`` picks gloo.

Tolerances (fp32; only the order of floating-point reductions differs between the runs):

* logged per-step loss: |Δ| ≤ 1e-5 (losses are 0.5–6, so ≤ 2e-6 relative); measured ≤ 1.5e-6;
* logged grad norm: relative ≤ 1e-4;
* final weights after 3 AdamW steps at lr 1e-2: |Δ| ≤ 5e-4 (5 % of one step; Adam divides by
  √v, which magnifies rounding where a gradient is near 0); measured ≤ 1e-4.

SequenceMatch online sampling cannot be bit-equal: each process samples continuations of its own
data shard with its own seed into its own replay buffer (emo_trainer/objectives/sequencematch/replay.py), and normalises
its model-trajectory term by its own Σγ^t.  It is checked for what it promises: both processes
sample, the loss is finite and close to the one-process curve (|Δ| ≤ 0.05; measured 1e-2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker
from dist_worker import GRAD_NORM_RTOL, LOSS_ATOL, ONLINE_SM_LOSS_ATOL, WEIGHT_ATOL

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, free_port):
    """``(one, two)``: results and weight directories of the 1-process and 2-process runs."""
    base = tmp_path_factory.mktemp("dist")
    two_dir, one_dir = base / "two", base / "one"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port),
        str(ROOT / "tests/dist_worker.py"), str(two_dir), "--per_device", "2",
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = json.loads((two_dir / "results.json").read_text())
    one = dist_worker.run_all(one_dir, per_device=4)
    return (one, one_dir), (two, two_dir)


def _weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / f"{name}.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst


def test_two_processes_really_ran(runs):
    (_, _), (two, _) = runs
    assert two["world"] == 2


def test_eval_loss_counts_every_sample_once(runs):
    """7 eval rows over 2 processes × 2 per device: accelerate repeats a sample to fill the last
    batch; the eval loss and token count must be those of the 7 rows (exact float64 loop here)."""
    (one, _), (two, _) = runs
    model = dist_worker.make_model().eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in dist_worker.make_rows("ragged", seed=3)[: dist_worker.EVAL_ROWS]:
            x = torch.tensor([row])
            z = model(input_ids=x).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(z, x[0, 1:], reduction="sum"))
            n += len(row) - 1
    for run in (one, two):
        assert run["eval"]["eval_tokens"] == n
        assert run["eval"]["eval_loss"] == pytest.approx(nll / n, rel=1e-6)
        assert run["eval"]["eval_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_a_process_skipping_its_whole_step_does_not_hang_the_others(runs):
    """MiLe + on_nonfinite: skip, a NaN on one process only: the run finishes (the step α's
    all-reduce is joined by the process that skipped), with finite logged losses."""
    (_, _), (two, _) = runs
    assert two["skip"]["steps"] == 2
    assert all(math.isfinite(x) for x in two["skip"]["loss"]), two["skip"]


EXACT = [n for n in dist_worker.DDP_CASES if n != "sequencematch_online"]


@pytest.mark.parametrize("name", EXACT)
def test_ddp_two_processes_equal_one_with_doubled_batch(runs, name):
    (one, one_dir), (two, two_dir) = runs
    if name not in one["ddp"]:
        pytest.skip(f"{dist_worker.CASES[name][0]} is not available in this build")
    a, b = one["ddp"][name], two["ddp"][name]
    assert a["steps"] == b["steps"] == dist_worker.STEPS
    assert len(a["loss"]) == len(b["loss"]) == dist_worker.STEPS
    for la, lb in zip(a["loss"], b["loss"]):
        assert math.isfinite(la) and abs(la - lb) <= LOSS_ATOL, (a["loss"], b["loss"])
    for ga, gb in zip(a["grad_norm"], b["grad_norm"]):
        assert abs(ga - gb) <= GRAD_NORM_RTOL * abs(ga), (a["grad_norm"], b["grad_norm"])
    wa, wb = _weights(one_dir, name), _weights(two_dir, name)
    _assert_same_weights(wa, wb)
    init = dict(dist_worker.make_model().named_parameters())
    moved = [float((wa[k] - p.detach()).abs().max()) for k, p in init.items() if k in wa and wa[k].shape == p.shape]
    assert max(moved) > 1e-3  # it trained


def test_ddp_sequencematch_online_sampling(runs):
    (one, _), (two, _) = runs
    if "sequencematch_online" not in one["ddp"]:
        pytest.skip("sequencematch is not available in this build")
    a, b = one["ddp"]["sequencematch_online"], two["ddp"]["sequencematch_online"]
    assert all(n > 0 for n in b["buffer_size_per_rank"]), b  # every process sampled its share
    assert all(r > 0 for r in b["sm_model_rows"]), b  # and trained on model trajectories
    for la, lb in zip(a["loss"], b["loss"]):
        assert math.isfinite(lb) and abs(la - lb) <= ONLINE_SM_LOSS_ATOL, (a["loss"], b["loss"])


@pytest.mark.parametrize("name", dist_worker.FSDP_CASES)
def test_fsdp2_sharded_head_equals_one_process(runs, name):
    """FSDP2 (fully_shard, CPU/gloo): the lm_head is a sharded DTensor, the chunked path is refused,
    EMO's cost embedding is the full matrix (read before sharding, or gathered), and the run
    equals the unsharded one-process run."""
    (one, one_dir), (two, two_dir) = runs
    a, b = one["fsdp2"][name], two["fsdp2"][name]
    assert b["head_is_dtensor"] and b["head_local_rows"] == dist_worker.VOCAB // 2
    assert b["chunked_supported"] is False
    if "cost_setup_sharded_maxdiff" in b:
        assert b["cost_setup_sharded_maxdiff"] == 0.0
    for la, lb in zip(a["loss"], b["loss"]):
        assert abs(la - lb) <= LOSS_ATOL, (a["loss"], b["loss"])
    _assert_same_weights(_weights(one_dir, f"fsdp2_{name}"), _weights(two_dir, f"fsdp2_{name}"))
