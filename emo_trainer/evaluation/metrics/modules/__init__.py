"""``evaluate`` modules (one ``EvaluationModule`` subclass per file, so ``evaluate.load(<file>)`` works)."""
