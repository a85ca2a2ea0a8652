#!/usr/bin/env python
"""Training cost of one SequenceMatch step versus one MLE step (CPU or GPU).

    python benchmarks/bench_sequencematch.py --help

The logic lives in :mod:`emo_trainer.benchmarks.sequencematch`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.benchmarks.sequencematch import main

if __name__ == "__main__":
    sys.exit(main())
