"""emo-trainer: train causal LMs with MLE, EMO, MixCE, MiLe or SequenceMatch-χ²."""

__version__ = "0.1.0"

