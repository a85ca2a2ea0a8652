#!/usr/bin/env python
"""Compare runs: eval curves side by side (PNG) and a Markdown table of final numbers.

    python scripts/compare.py runs/mle runs/emo runs/mixce --output-dir runs/compare
    python scripts/compare.py results.json --output-dir cmp        # a scripts/evaluate.py JSON: table only

The logic lives in :mod:`emo_trainer.evaluation.compare` (options: ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
