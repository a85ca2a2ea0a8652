"""SIGINT/SIGTERM during training (issue 18): the current optimizer step finishes, a complete
checkpoint is saved, one line says where and how to resume, and the exit code is the
conventional 128 + signal (130, 143); a second signal aborts at once.  The interrupted run is a
real subprocess of the training CLI (``tests/interrupt_worker.py`` waits inside step 6 until the
test has sent the signal); the resumed run then equals an uninterrupted one, with the tolerances of
``tests/test_resume.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import _args, _assert_same_run

from emo_trainer.cli import main
from emo_trainer.trainer import COMPLETE_MARKER, last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _interrupt(cli_args: list[str], marker: Path, signals: list[int], wait_for: int = 1,
               timeout: float = 300.0) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "tests/interrupt_worker.py"), "--wait_in_step", "6", str(marker),
           "--signals", str(wait_for), "--", *cli_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before step 6 (rc {proc.returncode}):\n{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the run did not reach step 6 in time")
            time.sleep(0.1)
        for sig in signals:
            os.kill(proc.pid, sig)
            time.sleep(0.3)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert main(_args(ref)) == 0
    return ref


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_the_resume_equals_an_uninterrupted_run(sig, uninterrupted, tmp_path):
    out = tmp_path / "run"
    rc, err = _interrupt(_args(out), tmp_path / "waiting", [sig])
    assert rc == 128 + sig, err[-3000:]  # 143 for SIGTERM, 130 for SIGINT
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "interrupted at step 6; resume with --resume_from_checkpoint true", err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    # steps 5 and 6 (after checkpoint-4) are kept: checkpoint-6 is complete, nothing else was written
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")
    assert not (out / "final").exists() and not (out / "final_metrics.json").exists()

    assert main(_args(out, ["--resume_from_checkpoint", "true"])) == 0
    _assert_same_run(uninterrupted, out)


def test_second_signal_aborts_at_once(tmp_path):
    out = tmp_path / "run"
    rc, err = _interrupt(_args(out), tmp_path / "waiting", [signal.SIGINT, signal.SIGINT], wait_for=2)
    assert rc == 130, err[-3000:]
    assert "SIGINT again: aborting now, without saving" in err
    assert not (out / "checkpoint-6").exists()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert (out / "checkpoint-4" / COMPLETE_MARKER).exists()
