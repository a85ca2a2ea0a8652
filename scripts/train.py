#!/usr/bin/env python
"""Train a causal LM with a configurable objective.

    python scripts/train.py --config configs/quickstart.yaml
    accelerate launch scripts/train.py --config configs/emo_gpt2.yaml --objective mixce --learning_rate 3e-5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.cli import main, make_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
