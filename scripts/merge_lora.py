#!/usr/bin/env python
"""Merge a LoRA adapter into its base model: one standalone checkpoint (weights + tokenizer).

    python scripts/merge_lora.py runs/calibrate_emo/final runs/calibrate_emo/merged
    python scripts/merge_lora.py ADAPTER_DIR OUT_DIR --base /path/to/base-model --dtype bfloat16

The logic lives in :mod:`emo_trainer.lora` (:func:`emo_trainer.lora.merge`; options: ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.lora import main

if __name__ == "__main__":
    sys.exit(main())
