#!/usr/bin/env python
"""The GPU verification driver of issue 15 (runbook: docs/distributed.md, "GPU verification runbook").

    python3 benchmarks/gpu_verify.py --list

The logic lives in :mod:`emo_trainer.benchmarks.gpu_verify`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.benchmarks.gpu_verify import main

if __name__ == "__main__":
    sys.exit(main())
