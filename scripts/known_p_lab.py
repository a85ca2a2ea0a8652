#!/usr/bin/env python
"""Known-P lab: train every objective on languages whose distribution P is known, measure exactly.

    python scripts/known_p_lab.py --output-dir runs/known_p            # CPU grid: ~13 CPU-minutes
    python scripts/known_p_lab.py --output-dir runs/known_p_full --full  # paper scale (sized for a GPU)
    python scripts/known_p_lab.py --evaluate runs/known_p_gpt2/final --data runs/known_p/data/V20-s0

The logic lives in :mod:`emo_trainer.known_p.cli` and :mod:`emo_trainer.known_p.lab` (options:
``--help``); see docs/known_p.md for the definitions and a measured table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.known_p.cli import main

if __name__ == "__main__":
    sys.exit(main())
