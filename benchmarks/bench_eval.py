#!/usr/bin/env python
"""Time one generation evaluation (the work GenerationEvalCallback does at every eval step).

    python benchmarks/bench_eval.py --help

The logic lives in :mod:`emo_trainer.benchmarks.evaluation`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.benchmarks.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
