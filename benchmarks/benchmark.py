#!/usr/bin/env python
"""Training-step time and peak memory of every objective × loss path (a benchmark, not a test).

    python benchmarks/benchmark.py --help

The logic lives in :mod:`emo_trainer.benchmarks.training_step`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.benchmarks.training_step import main

if __name__ == "__main__":
    sys.exit(main())
