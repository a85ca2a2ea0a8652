"""Generation and featurization sharded over 2 CPU processes (torch.distributed, gloo) and gathered in order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents

from emo_trainer.evaluation.metrics.mauve import HashingFeaturizer


@pytest.mark.slow
def test_two_processes(tmp_path, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(Path(__file__).parent / "dist_eval_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # rank 0 sampled prompts 0-2 with seed 7, rank 1 prompts 3-4 (+ one padding) with seed 8; order kept
    expected = [f"prompt {i} [{7 if i < 3 else 8}]" for i in range(5)]
    assert r0["texts"] == r1["texts"] == expected
    single = HashingFeaturizer()(documents(5))
    np.testing.assert_allclose(np.array(r0["feats"]), single, rtol=1e-6)
    np.testing.assert_allclose(np.array(r1["feats"]), single, rtol=1e-6)
    assert r0["broadcast"] == r1["broadcast"] == "from rank 0"
    assert r0["metrics"] == r1["metrics"] and r0["metrics"]["mauve_num_samples"] == 50
