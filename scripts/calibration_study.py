#!/usr/bin/env python
"""The calibration study: one pretrained checkpoint, calibrated with every objective, evaluated alike.

    python scripts/calibration_study.py --output-dir runs/study \\
        --model /path/to/gpt2-gutenberg-30m \\
        --train-file /path/to/wikitext-2/wiki.train.tokens \\
        --valid-file /path/to/wikitext-2-raw/wiki.valid.raw \\
        --test-file /path/to/wikitext-2-raw/wiki.test.raw \\
        --objectives none mle emo-m1=emo:emo.mode=1 emo-m2=emo:emo.mode=2 mixce mile

The logic lives in :mod:`emo_trainer.study` (``--help`` lists every option); docs/results.md has
the commands of the committed study.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.study import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
