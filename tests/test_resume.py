"""Crash and resume: SIGKILL between checkpoints, or while a checkpoint is being written, then
``--resume_from_checkpoint true`` gives the weights and the logged metrics of an uninterrupted run.

The killed run is a real subprocess of the training CLI (``tests/resume_worker.py`` makes it stop
at a known point; the test sends SIGKILL).  The uninterrupted and the resumed runs call the same
CLI in this process, with the same number of threads as the subprocess.

Tolerance: final weights |Δ| ≤ 1e-4 and every logged per-step value (loss, grad_norm,
learning_rate and the objective's diagnostics) and the final eval loss within 1e-4 relative.
Resuming reloads the weights (safetensors), optimizer, scheduler and RNG states and the
objective state, and skips the batches already seen, so the arithmetic is the same: resuming in
the same process is bit-identical (measured 0.0).  The killed run is another process, whose CPU
kernels may round differently under load; measured ≤ 2.2e-5 on the weights after 8 AdamW steps at
lr 1e-2 (0.2 % of one step).  What the bound catches: a cost embedding re-derived from the moved
head, a lost replay buffer or sampling RNG, a different init or data order: such bugs, met while
writing this test, moved the weights by 1e-3 to 1e-1.
Two things are *not* compared: ``train_loss`` of the final record (transformers averages it over
the steps run by that call, i.e. only the resumed part) and runtimes.  Logging windows must not
straddle a checkpoint (here logging_steps 2 divides save_steps 4): a window's objective
diagnostics live in memory and die with the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emo_trainer.cli import main
from emo_trainer.objectives import available
from emo_trainer.trainer import COMPLETE_MARKER, OBJECTIVE_STATE_TENSORS, last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_ATOL = 1e-4
LOG_RTOL = 1e-4
COMPARED_KEYS = ("loss", "grad_norm", "learning_rate", "ce", "demd", "weight", "sm_loss", "sm_v", "sm_buffer_size")


def _args(out: Path, extra=()) -> list[str]:
    return [
        "--config", str(ROOT / "configs/quickstart.yaml"), "--output_dir", str(out), "--max_steps", "8",
        "--save_steps", "4", "--logging_steps", "2", "--eval_strategy", "no", "--eval.generation", "false",
        "--data.max_train_samples", "300", "--data.max_eval_samples", "20", "--data.block_size", "32",
        "--per_device_train_batch_size", "4", "--warmup_steps", "0",
        "--model.config", "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
        *extra,
    ]


def _run_and_kill(pause: list[str], cli_args: list[str], marker: Path, timeout: float = 600.0) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "tests/resume_worker.py"), *pause, "--", *cli_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before the pause (rc {proc.returncode}):\n{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the run did not reach the pause in time")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _step_logs(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: {k: h[k] for k in COMPARED_KEYS if k in h} for h in history if "loss" in h}


def _assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_ATOL, worst
    la, lb = _step_logs(a), _step_logs(b)
    assert sorted(la) == sorted(lb) == [2, 4, 6, 8]
    for step in la:
        assert la[step].keys() == lb[step].keys(), step
        for k, v in la[step].items():
            assert abs(v - lb[step][k]) <= LOG_RTOL * max(1.0, abs(v)), (step, k, v, lb[step][k])
    ma = json.loads((a / "final_metrics.json").read_text())
    mb = json.loads((b / "final_metrics.json").read_text())
    assert abs(ma["eval_loss"] - mb["eval_loss"]) <= LOG_RTOL * ma["eval_loss"]


def make_pretrained_start(d: Path) -> Path:
    """A saved tiny model + tokenizer in ``d``: EMO's `initial` cost embedding comes from a real checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import quickstart_splits

    tok = train_bpe_tokenizer(quickstart_splits(seed=0)["train"][:500], vocab_size=300)
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok),
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pretrained_start(tmp_path_factory):
    return make_pretrained_start(tmp_path_factory.mktemp("pretrained"))


EMO_EXTRA = ["--objective", "emo", "--emo.cost_embedding", "initial", "--model.config", "null",
             "--model.train_tokenizer_vocab_size", "null", "--learning_rate", "1e-2"]


def test_emo_sigkill_between_checkpoints_then_resume(tmp_path, pretrained_start):
    from safetensors.torch import load_file

    from emo_trainer.objectives.emo import normalise_rows

    extra = [*EMO_EXTRA, "--model.name_or_path", str(pretrained_start)]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(_args(ref, extra)) == 0

    marker = tmp_path / "paused"
    _run_and_kill(["--pause_after_step", "6", str(marker)], _args(crashed, extra), marker)
    assert (crashed / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert not (crashed / "checkpoint-8").exists() and not (crashed / "final").exists()

    # The checkpoint holds the cost embedding of the starting model, not the moved head.
    stored = load_file(str(crashed / "checkpoint-4" / OBJECTIVE_STATE_TENSORS))["cost_embedding"]
    start_head = load_file(str(pretrained_start / "model.safetensors"))["transformer.wte.weight"]
    moved_head = load_file(str(crashed / "checkpoint-4" / "model.safetensors"))["transformer.wte.weight"]
    assert torch.equal(stored, normalise_rows(start_head))
    assert (normalise_rows(moved_head) - stored).abs().max() > 1e-3

    assert main(_args(crashed, [*extra, "--resume_from_checkpoint", "true"])) == 0
    _assert_same_run(ref, crashed)


@pytest.mark.skipif("sequencematch" not in available(), reason="sequencematch is not available in this build")
def test_sigkill_while_writing_checkpoint_keeps_last_good_one(tmp_path):
    """SequenceMatch, online: killed while checkpoint-8 is half written (save_total_limit 1).

    checkpoint-4 survives (old checkpoints are rotated only after the new one is complete), the
    incomplete checkpoint-8 is skipped by ``--resume_from_checkpoint true``, and the resumed run
    equals the uninterrupted one.  The replay buffer is *restored* from the checkpoint
    (objective_state.json), not rebuilt: after the resume, micro-batches keep drawing the
    trajectories sampled at steps 0 and 2.  The augmentation/draw RNG and the sampling RNG are
    restored too (objective_state.safetensors), so the refills at steps 4 and 6 sample exactly
    what the uninterrupted run sampled.
    """
    extra = ["--objective", "sequencematch", "--sequencematch.sample_every", "2", "--sequencematch.max_new_tokens", "6",
             "--sequencematch.prefix_tokens", "6", "--sequencematch.buffer_size", "16", "--save_total_limit", "1"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(_args(ref, extra)) == 0

    marker = tmp_path / "paused"
    _run_and_kill(["--pause_in_save", "8", str(marker)], _args(crashed, extra), marker)
    assert (crashed / "checkpoint-8" / "model.safetensors").exists()  # half written: weights but no marker
    assert not (crashed / "checkpoint-8" / COMPLETE_MARKER).exists()
    assert (crashed / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert last_complete_checkpoint(crashed) == str(crashed / "checkpoint-4")
    state = json.loads((crashed / "checkpoint-4" / "objective_state.json").read_text())
    assert state["objective"] == "sequencematch" and len(state["state"]["buffer"]["items"]) > 0

    assert main(_args(crashed, [*extra, "--resume_from_checkpoint", "true"])) == 0
    _assert_same_run(ref, crashed)
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-8"]
