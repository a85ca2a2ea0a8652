#!/usr/bin/env python
"""Evaluate checkpoints with the training-time protocol and write a JSON of results.

    python scripts/evaluate.py runs/emo/final runs/mle/final --eval-files /path/to/wikitext-103/wiki.test.raw \\
        --featurizer /path/to/gpt2-large --num-prompts 1000 --seeds 0 1 2 --output results.json
    python scripts/evaluate.py runs/quickstart/checkpoint-300 --output q.json   # data + eval from the run's config
    accelerate launch scripts/evaluate.py ...                                      # prompts sharded over GPUs

The logic lives in :mod:`emo_trainer.evaluation.evaluate_cli` (options: ``--help``); checkpoint
loading, document perplexity and SequenceMatch detection in :mod:`emo_trainer.evaluation.checkpoints`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from emo_trainer.evaluation.evaluate_cli import main

if __name__ == "__main__":
    sys.exit(main())
